"""The user's hutch configuration: ``HUTCH_HOME/config.toml`` (optional).

::

    [images]
    cache_max_bytes = "20G"     # blob cache budget (least-recently-used blobs are pruned)
    base_size = "8G"            # apparent size of base disks built from pulled images

    [registries."localhost:5000"]   # read by hutch.images.credentials
    insecure = true

Sizes are integers (bytes) or strings with a K/M/G/T suffix (powers of 1024).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hutch.errors import ConfigError
from hutch.paths import HutchPaths

CONFIG_NAME = "config.toml"

DEFAULT_CACHE_MAX_BYTES = 20 << 30
DEFAULT_BASE_SIZE = 8 << 30
MIN_BASE_SIZE = 256 << 20
MAX_BASE_SIZE = 2 << 40

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def parse_size(value: object, where: str) -> int:
    """``123``, ``"512M"``, ``"8G"``, ``"8GiB"`` → bytes; ConfigError naming ``where`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    raise ConfigError(
        f"{where}: {value!r} is not a size", hint='Use bytes or a suffixed size such as "8G".'
    )


def load_config(paths: HutchPaths) -> dict[str, Any]:
    """The parsed config file, ``{}`` when there is none; ConfigError if it is not valid TOML."""
    f = paths.home / CONFIG_NAME
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {f}: {e.strerror}") from e
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f} is not valid TOML: {e}", hint="Fix or remove the file.") from e


@dataclass(frozen=True)
class ImagesConfig:
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    base_size: int = DEFAULT_BASE_SIZE

    @classmethod
    def load(cls, paths: HutchPaths) -> ImagesConfig:
        table = load_config(paths).get("images", {})
        where = str(paths.home / CONFIG_NAME)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [images] must be a table")
        unknown = set(table) - {"cache_max_bytes", "base_size"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) in [images]: {', '.join(sorted(unknown))}",
                hint="Known keys: cache_max_bytes, base_size.",
            )
        cache = parse_size(
            table.get("cache_max_bytes", DEFAULT_CACHE_MAX_BYTES),
            f"{where} [images] cache_max_bytes",
        )
        base = parse_size(table.get("base_size", DEFAULT_BASE_SIZE), f"{where} [images] base_size")
        if not MIN_BASE_SIZE <= base <= MAX_BASE_SIZE:
            raise ConfigError(
                f"{where}: [images] base_size must be between 256M and 2T, not {base}"
            )
        return cls(cache_max_bytes=cache, base_size=base)


def config_path(paths: HutchPaths) -> Path:
    return paths.home / CONFIG_NAME


__all__ = ["ImagesConfig", "config_path", "load_config", "parse_size"]
