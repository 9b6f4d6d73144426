"""Per-registry settings for pulls: transport (``insecure``, ``ca_file``) and credentials.

Two sources, read once per pull by :meth:`RegistrySettings.load`:

1. hutch's own config, ``HUTCH_HOME/config.toml``::

       [registries."registry.example.com:5000"]
       ca_file = "/etc/ssl/private-ca.pem"   # extra CA for this registry (relative = to HUTCH_HOME)
       insecure = false                      # true = plain HTTP (localhost/127.0.0.1/[::1] default to it)
       username = "ci"
       password_file = "~/.secrets/registry" # or password = "…" (not both)

2. Docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``): its
   ``auths`` (``auth`` = base64 ``user:password``, or ``username``/``password``, or
   ``identitytoken``), and its ``credHelpers``/``credsStore``, which are asked lazily — only for the
   registry being pulled — by running ``docker-credential-<helper> get`` with a short timeout.

hutch's config wins over Docker's: a ``username`` there replaces Docker's credentials for that
registry. Every rejection is a :class:`ConfigError` naming the file and the key, because a typo in
a credentials file otherwise surfaces much later as a puzzling 401.

Registry keys are normalised like Docker does: scheme and path are dropped, host names are
lower-cased, and Docker Hub's aliases (``https://index.docker.io/v1/``, ``registry-1.docker.io``,
``docker.io``) are one key, so ``for_registry`` accepts both ``ref.registry`` and ``ref.api_host``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hutch.config import config_path, load_config
from hutch.errors import ConfigError
from hutch.paths import HutchPaths

log = logging.getLogger("hutch.images.credentials")

DOCKER_HUB_KEY = "docker.io"
#: The key Docker itself uses for Docker Hub in config.json and credential helpers.
DOCKER_HUB_LEGACY = "https://index.docker.io/v1/"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
#: Registries spoken to over plain HTTP unless configured otherwise (Docker does the same).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
HELPER_TIMEOUT = 10.0
_HUTCH_KEYS = frozenset({"insecure", "ca_file", "username", "password", "password_file"})


def normalize_registry(key: str) -> str:
    """``https://Index.Docker.io/v1/`` → ``docker.io``; ``http://localhost:5000/v2/`` → ``localhost:5000``."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.split("/", 1)[0]
    if not k.startswith("["):
        k = k.lower()
    return DOCKER_HUB_KEY if k in _HUB_ALIASES else k


def _hostname(registry: str) -> str:
    """The host part of ``host[:port]`` (IPv6 literals keep their brackets)."""
    if registry.startswith("["):
        return registry[: registry.index("]") + 1] if "]" in registry else registry
    return registry.rsplit(":", 1)[0] if ":" in registry else registry


@dataclass(frozen=True)
class RegistryEntry:
    """What the client needs to talk to one registry."""

    insecure: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)

    @property
    def has_credentials(self) -> bool:
        return bool(self.username and self.password is not None) or bool(self.identity_token)


@dataclass(frozen=True)
class _HutchEntry:
    insecure: bool | None = None
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _DockerAuth:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RegistrySettings:
    """Registry settings from hutch's config and Docker's; see the module docstring."""

    hutch: Mapping[str, _HutchEntry] = field(default_factory=dict)
    docker: Mapping[str, _DockerAuth] = field(default_factory=dict)
    #: Credential helper per registry key (``credHelpers``) and the default (``credsStore``).
    helpers: Mapping[str, str] = field(default_factory=dict)
    creds_store: str | None = None
    config_file: Path | None = None
    docker_config_file: Path | None = None
    _helper_cache: dict[str, _DockerAuth | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    _helper_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def empty(cls) -> RegistrySettings:
        return cls()

    @classmethod
    def load(cls, paths: HutchPaths, *, docker_config_dir: Path | None = None) -> RegistrySettings:
        """Read ``HUTCH_HOME/config.toml`` and Docker's ``config.json`` (both optional)."""
        cfg_file = config_path(paths)
        hutch = _parse_hutch(load_config(paths), cfg_file)
        if docker_config_dir is None:
            env = os.environ.get("DOCKER_CONFIG")
            docker_config_dir = Path(env).expanduser() if env else Path.home() / ".docker"
        docker_file = docker_config_dir / "config.json"
        docker, helpers, store = _parse_docker(docker_file)
        return cls(
            hutch=hutch,
            docker=docker,
            helpers=helpers,
            creds_store=store,
            config_file=cfg_file,
            docker_config_file=docker_file,
        )

    def for_registry(self, host: str) -> RegistryEntry:
        """Settings for ``host[:port]`` (``ref.registry`` or ``ref.api_host``)."""
        key = normalize_registry(host)
        h = self.hutch.get(key, _HutchEntry())
        if h.insecure is not None:
            insecure = h.insecure
        else:  # a configured CA means TLS; loopback registries default to plain HTTP
            insecure = h.ca_file is None and _hostname(key) in LOOPBACK_HOSTS
        username, password, identity = h.username, h.password, None
        if username is None:
            d = self.docker.get(key) or self._from_helper(key)
            if d is not None:
                username, password, identity = d.username, d.password, d.identity_token
        return RegistryEntry(
            insecure=insecure,
            ca_file=h.ca_file,
            username=username,
            password=password,
            identity_token=identity,
        )

    def _from_helper(self, key: str) -> _DockerAuth | None:
        helper = self.helpers.get(key) or self.creds_store
        if not helper:
            return None
        with self._helper_lock:
            if key not in self._helper_cache:
                self._helper_cache[key] = _run_helper(helper, key)
            return self._helper_cache[key]


# --- hutch config.toml ----------------------------------------------------------------------
def _parse_hutch(doc: dict[str, Any], cfg_file: Path) -> dict[str, _HutchEntry]:
    table = doc.get("registries", {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"{cfg_file}: 'registries' must be a table",
            hint='Write [registries."HOST[:PORT]"] sections.',
        )
    out: dict[str, _HutchEntry] = {}
    for raw_key, entry in table.items():
        where = f'{cfg_file}: [registries."{raw_key}"]'
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where} must be a table", hint='Quote the host: [registries."localhost:5000"].'
            )
        unknown = set(entry) - _HUTCH_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                hint=f"Known keys: {', '.join(sorted(_HUTCH_KEYS))}.",
            )
        insecure = entry.get("insecure")
        if insecure is not None and not isinstance(insecure, bool):
            raise ConfigError(f"{where}: insecure must be true or false, not {insecure!r}")
        ca_file = None
        if "ca_file" in entry:
            ca_file = _path(entry["ca_file"], f"{where} ca_file", cfg_file.parent)
            if not ca_file.is_file():
                raise ConfigError(
                    f"{where}: ca_file {str(ca_file)!r} is not a readable file",
                    hint="Point ca_file at a PEM bundle holding the registry's CA certificate.",
                )
        username = entry.get("username")
        if username is not None and (not isinstance(username, str) or not username):
            raise ConfigError(f"{where}: username must be a non-empty string")
        password = entry.get("password")
        if password is not None and not isinstance(password, str):
            raise ConfigError(f"{where}: password must be a string")
        if "password_file" in entry:
            if password is not None:
                raise ConfigError(f"{where}: set password or password_file, not both")
            pf = _path(entry["password_file"], f"{where} password_file", cfg_file.parent)
            try:
                password = pf.read_text().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where}: cannot read password_file {str(pf)!r}: {e}") from e
        if (username is None) != (password is None):
            raise ConfigError(
                f"{where}: username and password (or password_file) go together",
                hint="Set both, or neither for anonymous pulls.",
            )
        out[normalize_registry(str(raw_key))] = _HutchEntry(insecure, ca_file, username, password)
    return out


def _path(value: object, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path string, not {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


# --- Docker config.json ---------------------------------------------------------------------
def _parse_docker(
    path: Path,
) -> tuple[dict[str, _DockerAuth], dict[str, str], str | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, {}, None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path} is not valid JSON: {e}", hint="Fix the file or run `docker login` again."
        ) from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} is not a JSON object")
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"{path}: 'auths' must be an object")
    out: dict[str, _DockerAuth] = {}
    for raw_key, entry in auths.items():
        where = f'{path}: auths."{raw_key}"'
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object")
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            auth = entry["auth"]
            try:
                if not isinstance(auth, str):
                    raise ValueError("not a string")
                decoded = base64.b64decode(auth, validate=True).decode()
            except (ValueError, binascii.Error, UnicodeDecodeError) as e:
                raise ConfigError(
                    f"{where}.auth is not base64 of USER:PASSWORD ({e})",
                    hint="Run `docker login` again or fix the entry.",
                ) from e
            username, sep, password = decoded.partition(":")
            if not sep or not username:
                raise ConfigError(f"{where}.auth does not decode to USER:PASSWORD")
        for name, v in (("username", username), ("password", password)):
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{where}.{name} must be a string")
        identity = entry.get("identitytoken") or None
        if identity is not None and not isinstance(identity, str):
            raise ConfigError(f"{where}.identitytoken must be a string")
        if not (username or identity):
            continue  # an empty entry: docker login stored the secret in a credsStore
        out[normalize_registry(str(raw_key))] = _DockerAuth(username, password, identity)
    helpers_doc = doc.get("credHelpers", {})
    if not isinstance(helpers_doc, dict) or not all(
        isinstance(v, str) for v in helpers_doc.values()
    ):
        raise ConfigError(f"{path}: 'credHelpers' must map registries to helper names")
    helpers = {normalize_registry(str(k)): v for k, v in helpers_doc.items() if v}
    store = doc.get("credsStore") or None
    if store is not None and not isinstance(store, str):
        raise ConfigError(f"{path}: 'credsStore' must be a string")
    return out, helpers, store


def _run_helper(helper: str, key: str) -> _DockerAuth | None:
    """``docker-credential-HELPER get`` for ``key``; None (logged) when it has nothing."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        log.debug("credential helper docker-credential-%s is not installed; ignoring it", helper)
        return None
    server = DOCKER_HUB_LEGACY if key == DOCKER_HUB_KEY else key
    try:
        proc = subprocess.run(
            [exe, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("credential helper docker-credential-%s failed for %s: %s", helper, key, e)
        return None
    if proc.returncode != 0:
        log.debug(
            "docker-credential-%s has no credentials for %s: %s",
            helper,
            key,
            proc.stdout.decode(errors="replace").strip() or proc.returncode,
        )
        return None
    try:
        doc = json.loads(proc.stdout)
        user, secret = doc["Username"], doc["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise ValueError("Username/Secret are not strings")
    except (ValueError, KeyError, TypeError) as e:
        log.warning("docker-credential-%s printed an unreadable answer for %s: %s", helper, key, e)
        return None
    if user == "<token>":  # Docker's convention for identity (refresh) tokens
        return _DockerAuth(identity_token=secret)
    return _DockerAuth(user, secret)


__all__ = [
    "DOCKER_HUB_LEGACY",
    "LOOPBACK_HOSTS",
    "RegistryEntry",
    "RegistrySettings",
    "normalize_registry",
]
