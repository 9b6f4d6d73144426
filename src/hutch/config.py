"""The user's hutch configuration: ``HUTCH_HOME/config.toml`` (optional).

::

    [images]
    cache_max_bytes = "20G"     # blob cache budget (least-recently-used blobs are pruned)
    base_size = "8G"            # apparent size of base disks built from pulled images

    [registries."localhost:5000"]   # read by hutch.images.credentials
    insecure = true

    [pool]                      # warm pools of a Runtime(pool=True) (hutch.runtime.pool)
    max_restores = 1            # pool restores in flight at a time, all pools together (1-4)
    [[pool.boxes]]              # one table per pool
    image = "busybox"
    cpus = 1                    # default 1
    memory_mib = 256            # default 256
    size = 2                    # ready boxes kept (default 1)

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


#: Most pool restores in flight at a time (each is a QEMU starting up: CPU-bound under TCG).
MAX_POOL_RESTORES = 4
POOL_KEYS = frozenset({"max_restores", "boxes"})
POOL_BOX_KEYS = frozenset({"image", "cpus", "memory_mib", "size", "accel"})


@dataclass(frozen=True)
class PoolConfig:
    """The ``[pool]`` table: warm pools a ``Runtime(pool=True)`` keeps. The entries of
    ``boxes`` are checked for their keys here and for their values by
    :class:`hutch.runtime.pool.PoolSpec`."""

    max_restores: int = 1
    boxes: tuple[dict[str, Any], ...] = ()

    @classmethod
    def load(cls, paths: HutchPaths) -> PoolConfig:
        table = load_config(paths).get("pool", {})
        where = str(paths.home / CONFIG_NAME)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [pool] must be a table")
        unknown = set(table) - POOL_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) in [pool]: {', '.join(sorted(unknown))}",
                hint=f"Known keys: {', '.join(sorted(POOL_KEYS))}.",
            )
        most = table.get("max_restores", 1)
        if (
            isinstance(most, bool)
            or not isinstance(most, int)
            or not 1 <= most <= MAX_POOL_RESTORES
        ):
            raise ConfigError(
                f"{where}: [pool] max_restores must be 1 to {MAX_POOL_RESTORES}, not {most!r}"
            )
        boxes = table.get("boxes", [])
        if not isinstance(boxes, list) or not all(isinstance(b, dict) for b in boxes):
            raise ConfigError(
                f"{where}: [pool] boxes must be an array of tables ([[pool.boxes]])",
                hint='e.g. [[pool.boxes]] image = "busybox" size = 2',
            )
        for i, entry in enumerate(boxes):
            unknown = set(entry) - POOL_BOX_KEYS
            if unknown:
                raise ConfigError(
                    f"{where}: unknown key(s) in [[pool.boxes]] #{i + 1}: "
                    f"{', '.join(sorted(unknown))}",
                    hint=f"Known keys: {', '.join(sorted(POOL_BOX_KEYS))}.",
                )
        return cls(max_restores=most, boxes=tuple(dict(b) for b in boxes))


def config_path(paths: HutchPaths) -> Path:
    return paths.home / CONFIG_NAME


__all__ = ["ImagesConfig", "PoolConfig", "config_path", "load_config", "parse_size"]
