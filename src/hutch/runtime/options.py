"""What a box is made of: :class:`BoxOptions`, with its :class:`Port` and :class:`Volume` entries.

Options are validated when they are made (``__post_init__`` calls :meth:`BoxOptions.validate`), so
an invalid box can never reach the store. Every :class:`~hutch.errors.ConfigError` names the field
(``ports[1].host``), the bad value and what is allowed, because the same message reaches a Python
caller, the CLI and (later) an HTTP client.

Two rules depend on the *host*, not on the options: ``cpus`` against this host's CPU count, and
volume host paths existing. They are checked when options are made by a caller, but not when they
are read back from the store (:meth:`BoxOptions.from_json`): a stored box whose volume folder has
since been deleted must still be listable and removable. The runtime calls
``options.validate()`` again before it starts a box, which re-checks them.

Options are immutable (``env``/``labels`` become read-only mappings, ``ports``/``volumes`` tuples)
and round-trip through JSON (``to_json``/``from_json``) for the box store; rows written before a
field existed (``network``) read back with its default.

How they are applied: ``volumes`` by :mod:`hutch.vm.volumes` (virtio-9p), ``network`` and
``ports`` by :mod:`hutch.vm.network` (user-mode NAT, QEMU's slirp).
"""

from __future__ import annotations

import contextvars
import ipaddress
import math
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

from hutch.errors import ConfigError
from hutch.vm.accel import ACCELS

NetworkMode = Literal["none", "outbound", "allowlist"]

PROTOCOLS = ("tcp", "udp")
#: ``none``: no network (a box with published ports gets a NIC that only carries their
#: forwards); ``outbound``: user-mode NAT to wherever the host can reach; ``allowlist``: only
#: the hosts and networks ``allow`` lists, through a filtering HTTP proxy (:mod:`hutch.vm.egress`).
NETWORK_MODES = ("none", "outbound", "allowlist")
#: Most volumes one box may have (each is a virtio-mmio device; microvm has 24 slots).
MAX_VOLUMES = 16
#: Most published ports one box may have (each is a listening socket of its QEMU).
MAX_PORTS = 128
MEMORY_MIB_MIN = 128
MEMORY_MIB_MAX = 65536
DISK_MIB_MIN = 256
DISK_MIB_MAX = 2 * 1024 * 1024  # 2 TiB
PORT_MAX = 65535

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,127}")
LABEL_VALUE_MAX = 4096
#: Guest folders a volume may not cover: the agent and the kernel need them as they are.
RESERVED_GUEST_PATHS = ("/", "/proc", "/sys", "/dev")

NAME_HINT = (
    "A name is 1 to 63 characters of lowercase letters, digits, '_', '.' and '-', "
    "starting with a letter or a digit."
)

#: False while options are rebuilt from the store: host-dependent rules are skipped then.
_HOST_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("host_checks", default=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(where: str, value: object, lo: int, hi: int, note: str = "") -> None:
    if not _is_int(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise ConfigError(f"{where} must be an integer between {lo} and {hi}{note}, not {value!r}")


def _check_text(where: str, value: object, *, max_len: int = 4096, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    if not value and not empty_ok:
        raise ConfigError(f"{where} must not be empty")
    if "\0" in value:
        raise ConfigError(f"{where} must not contain a NUL byte, not {value!r}")
    if len(value) > max_len:
        raise ConfigError(f"{where} must be at most {max_len} characters, not {len(value)}")
    return value


def _check_absolute(where: str, value: object) -> str:
    text = _check_text(where, value)
    if not text.startswith("/"):
        raise ConfigError(f"{where} must be an absolute path (starting with '/'), not {text!r}")
    return text


def check_name(name: object, where: str = "name") -> str:
    """Raise ConfigError unless ``name`` is a valid box name (``[a-z0-9][a-z0-9_.-]{0,62}``)."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise ConfigError(
            f"{where} must match [a-z0-9][a-z0-9_.-]{{0,62}}, not {name!r}", hint=NAME_HINT
        )
    return name


def _under(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root + "/")


@dataclass(frozen=True)
class Port:
    """Publish ``guest`` port on ``host_ip:host`` (``host=0``: pick a free host port)."""

    host: int
    guest: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_ip: str = "127.0.0.1"

    @classmethod
    def parse(cls, spec: str) -> Port:
        """``[host_ip:]host:guest[/protocol]`` or ``guest[/protocol]`` (host port picked);
        an IPv6 host_ip is written in brackets: ``[::1]:8080:80``."""
        where = f"port {spec!r}"
        text, _, proto = spec.partition("/")
        protocol = proto or "tcp"
        host_ip = "127.0.0.1"
        if text.startswith("["):
            ip, sep, rest = text[1:].partition("]:")
            if not sep:
                raise ConfigError(f"{where}: expected [ipv6]:host:guest")
            host_ip, parts = ip, rest.split(":")
        else:
            parts = text.split(":")
            if len(parts) == 3:
                host_ip, parts = parts[0], parts[1:]
        if len(parts) == 1:
            parts = ["0", parts[0]]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(
                f"{where} must look like [host_ip:]host:guest[/tcp|udp], e.g. 8080:80",
            )
        port = cls(int(parts[0]), int(parts[1]), protocol, host_ip)  # type: ignore[arg-type]
        port.validate()
        return port

    def validate(self, where: str = "port") -> None:
        _check_int(f"{where}.host", self.host, 0, PORT_MAX, " (0 = pick a free port)")
        _check_int(f"{where}.guest", self.guest, 1, PORT_MAX)
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"{where}.protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}"
            )
        try:
            ipaddress.ip_address(self.host_ip)
        except ValueError:
            raise ConfigError(
                f"{where}.host_ip must be an IP address (e.g. 127.0.0.1, 0.0.0.0 or ::1), "
                f"not {self.host_ip!r}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "guest": self.guest,
            "protocol": self.protocol,
            "host_ip": self.host_ip,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Port:
        return cls(
            host=d["host"],
            guest=d["guest"],
            protocol=d.get("protocol", "tcp"),
            host_ip=d.get("host_ip", "127.0.0.1"),
        )


@dataclass(frozen=True)
class Volume:
    """Share the host folder or file ``host_path`` at ``guest_path`` in the box (virtio-9p;
    ``read_only`` is enforced by QEMU). See :mod:`hutch.vm.volumes` for ownership and files."""

    host_path: str
    guest_path: str
    read_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> Volume:
        """``/host/path:/guest/path[:ro|:rw]``."""
        parts = spec.split(":")
        read_only = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            read_only = parts.pop() == "ro"
        if len(parts) != 2:
            raise ConfigError(
                f"volume {spec!r} must look like /host/path:/guest/path[:ro], "
                "e.g. /srv/data:/data:ro"
            )
        volume = cls(parts[0], parts[1], read_only)
        volume.validate()
        return volume

    def validate(self, where: str = "volume", *, host: bool = True) -> None:
        host_path = _check_absolute(f"{where}.host_path", self.host_path)
        if host and not os.path.exists(host_path):
            raise ConfigError(
                f"{where}.host_path {host_path!r} does not exist",
                hint="Create the folder first, or fix the path (it must exist on this host).",
            )
        if host and not (os.path.isdir(host_path) or os.path.isfile(host_path)):
            raise ConfigError(
                f"{where}.host_path {host_path!r} must be a folder or a regular file",
                hint="Devices, sockets and FIFOs cannot be shared with a box.",
            )
        guest = _check_absolute(f"{where}.guest_path", self.guest_path)
        norm = posixpath.normpath(guest)
        for reserved in RESERVED_GUEST_PATHS:
            if norm == reserved or (reserved != "/" and _under(norm, reserved)):
                raise ConfigError(
                    f"{where}.guest_path must not be {reserved!r}"
                    + ("" if reserved == "/" else " or below it")
                    + f", not {guest!r}",
                    hint="Mount the volume at a folder of its own, e.g. /data.",
                )
        if not isinstance(self.read_only, bool):
            raise ConfigError(f"{where}.read_only must be true or false, not {self.read_only!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "host_path": self.host_path,
            "guest_path": self.guest_path,
            "read_only": self.read_only,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Volume:
        return cls(d["host_path"], d["guest_path"], bool(d.get("read_only", False)))


def _frozen_mapping(where: str, value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of strings to strings, not {value!r}")
    return MappingProxyType(dict(value))


def _frozen_items(where: str, value: object, kind: type) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | tuple | list):
        raise ConfigError(f"{where} must be a list of {kind.__name__}, not {value!r}")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise ConfigError(
                f"{where}[{i}] must be a {kind.__name__}, not {item!r}",
                hint=f"Use hutch.runtime.options.{kind.__name__}(...) or "
                f"{kind.__name__}.parse('...').",
            )
    return items


def _ip_overlap(a: str, b: str) -> bool:
    """Two bind addresses clash: equal, or one is the wildcard of the same family."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ia.version != ib.version:
        return False
    return ia == ib or ia.is_unspecified or ib.is_unspecified


@dataclass(frozen=True)
class BoxOptions:
    """Everything a box is created with. Invalid values raise ConfigError at construction."""

    image: str = "busybox"
    name: str | None = None
    cpus: int = 1
    memory_mib: int = 256
    #: Root disk size; None = the image's base size.
    disk_size_mib: int | None = None
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    workdir: str | None = None
    user: str | None = None
    ports: Sequence[Port] = ()
    volumes: Sequence[Volume] = ()
    #: ``"none"`` (no network; published ports still work) or ``"outbound"`` (NAT).
    network: NetworkMode = "none"
    #: With ``network="allowlist"``: CIDRs, host names and ``*.suffix`` patterns the box may reach.
    allow: Sequence[str] = ()
    auto_remove: bool = False
    accel: str = "auto"
    boot_timeout: float = 30.0
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "env", _frozen_mapping("env", self.env))
        set_(self, "labels", _frozen_mapping("labels", self.labels))
        set_(self, "ports", _frozen_items("ports", self.ports, Port))
        set_(self, "volumes", _frozen_items("volumes", self.volumes, Volume))
        if isinstance(self.allow, str):
            raise ConfigError("allow must be a list of CIDRs and host names, not a string")
        set_(self, "allow", tuple(self.allow))
        self.validate(host=_HOST_CHECKS.get())

    def validate(self, *, host: bool = True) -> None:
        """Check every rule; ``host=False`` skips the host-dependent ones (CPU count, volume
        host paths existing)."""
        _check_text("image", self.image, max_len=512)
        if any(c.isspace() for c in self.image):
            raise ConfigError(f"image must not contain whitespace, not {self.image!r}")
        if self.name is not None:
            check_name(self.name)
        host_cpus = os.cpu_count() or 1
        if host:
            _check_int("cpus", self.cpus, 1, host_cpus, " (this host's CPUs)")
        else:
            _check_int("cpus", self.cpus, 1, 1024)
        _check_int("memory_mib", self.memory_mib, MEMORY_MIB_MIN, MEMORY_MIB_MAX)
        if self.disk_size_mib is not None:
            _check_int("disk_size_mib", self.disk_size_mib, DISK_MIB_MIN, DISK_MIB_MAX, " (2 TiB)")
        self._validate_env()
        if self.workdir is not None:
            _check_absolute("workdir", self.workdir)
        if self.user is not None:
            _check_text("user", self.user, max_len=256)
            if any(c.isspace() for c in self.user):
                raise ConfigError(
                    f"user must be a user name or uid[:gid] without whitespace, not {self.user!r}"
                )
        if self.network not in NETWORK_MODES:
            raise ConfigError(
                f"network must be one of {', '.join(NETWORK_MODES)}, not {self.network!r}",
                hint="'none': no network (published ports still work); 'outbound': user-mode "
                "NAT to what the host can reach; 'allowlist': only what allow= lists.",
            )
        if self.network == "allowlist":
            from hutch.vm.egress import AllowList

            if not self.allow:
                raise ConfigError(
                    "network='allowlist' needs allow=[...]: the CIDRs and host names the box "
                    "may reach",
                    hint="e.g. allow=['pypi.org', '*.pythonhosted.org', '10.1.0.0/16'], or "
                    "network='none' for no network at all.",
                )
            AllowList.parse(self.allow)
        elif self.allow:
            raise ConfigError(
                f"allow= is only for network='allowlist', not {self.network!r}",
                hint="Pass network='allowlist' with it.",
            )
        self._validate_ports()
        self._validate_volumes(host=host)
        if not isinstance(self.auto_remove, bool):
            raise ConfigError(f"auto_remove must be true or false, not {self.auto_remove!r}")
        if self.accel not in ACCELS:
            raise ConfigError(
                f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}",
                hint="accel='auto' uses KVM when a probe guest boots under it, else TCG.",
            )
        bt = self.boot_timeout
        if (
            isinstance(bt, bool)
            or not isinstance(bt, int | float)
            or not math.isfinite(bt)
            or bt <= 0
        ):
            raise ConfigError(f"boot_timeout must be a number of seconds > 0, not {bt!r}")
        self._validate_labels()

    def _validate_env(self) -> None:
        for k, v in self.env.items():
            if not isinstance(k, str) or ENV_NAME_RE.fullmatch(k) is None:
                raise ConfigError(
                    f"env name {k!r} must match [A-Za-z_][A-Za-z0-9_]*",
                    hint="Environment variable names are letters, digits and '_', "
                    "not starting with a digit.",
                )
            _check_text(f"env[{k!r}]", v, max_len=128 * 1024, empty_ok=True)

    def _validate_labels(self) -> None:
        for k, v in self.labels.items():
            if not isinstance(k, str) or LABEL_KEY_RE.fullmatch(k) is None:
                raise ConfigError(
                    f"label name {k!r} must match [A-Za-z0-9][A-Za-z0-9_./-]{{0,127}}",
                    hint="e.g. com.example.team or app",
                )
            _check_text(f"labels[{k!r}]", v, max_len=LABEL_VALUE_MAX, empty_ok=True)

    def _validate_ports(self) -> None:
        seen_host: list[tuple[int, Port]] = []
        seen_guest: dict[tuple[int, str], int] = {}
        if len(self.ports) > MAX_PORTS:
            raise ConfigError(f"ports must have at most {MAX_PORTS} entries, not {len(self.ports)}")
        for i, port in enumerate(self.ports):
            port.validate(f"ports[{i}]")
            gkey = (port.guest, port.protocol)
            if gkey in seen_guest:
                raise ConfigError(
                    f"ports[{i}] publishes guest port {port.guest}/{port.protocol} again "
                    f"(already ports[{seen_guest[gkey]}]); each guest port and protocol "
                    "may be published once"
                )
            seen_guest[gkey] = i
            if port.host == 0:
                continue  # picked at start: never clashes
            for j, other in seen_host:
                if (
                    other.host == port.host
                    and other.protocol == port.protocol
                    and _ip_overlap(other.host_ip, port.host_ip)
                ):
                    raise ConfigError(
                        f"ports[{i}] uses host port {port.host_ip}:{port.host}/{port.protocol} "
                        f"again (already ports[{j}] on {other.host_ip}); each host address, "
                        "port and protocol may be used once"
                    )
            seen_host.append((i, port))

    def _validate_volumes(self, *, host: bool) -> None:
        seen: dict[str, int] = {}
        if len(self.volumes) > MAX_VOLUMES:
            raise ConfigError(
                f"volumes must have at most {MAX_VOLUMES} entries, not {len(self.volumes)}",
                hint="Share a common parent folder instead of many small ones.",
            )
        for i, volume in enumerate(self.volumes):
            volume.validate(f"volumes[{i}]", host=host)
            guest = posixpath.normpath(volume.guest_path)
            if guest in seen:
                raise ConfigError(
                    f"volumes[{i}].guest_path {volume.guest_path!r} is already used by "
                    f"volumes[{seen[guest]}]; each guest path may be mounted once"
                )
            seen[guest] = i

    # --- JSON (the box store) -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "name": self.name,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disk_size_mib": self.disk_size_mib,
            "env": dict(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "ports": [p.to_json() for p in self.ports],
            "volumes": [v.to_json() for v in self.volumes],
            "network": self.network,
            "allow": list(self.allow),
            "auto_remove": self.auto_remove,
            "accel": self.accel,
            "boot_timeout": self.boot_timeout,
            "labels": dict(self.labels),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BoxOptions:
        """Rebuild stored options. Unknown keys (from a newer hutch) are ignored, missing ones take
        their defaults; host-dependent rules are not checked (see the module docstring)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["ports"] = tuple(Port.from_json(p) for p in d.get("ports", ()))
        kwargs["volumes"] = tuple(Volume.from_json(v) for v in d.get("volumes", ()))
        token = _HOST_CHECKS.set(False)
        try:
            return cls(**kwargs)
        finally:
            _HOST_CHECKS.reset(token)


__all__ = [
    "ACCELS",
    "MAX_PORTS",
    "MAX_VOLUMES",
    "NETWORK_MODES",
    "PROTOCOLS",
    "BoxOptions",
    "NetworkMode",
    "Port",
    "Volume",
    "check_name",
]
