"""Network modes and published ports, over QEMU's user-mode network (slirp: no root, no bridge).

A box gets a NIC (``-netdev user,…`` + ``-device virtio-net-device,…,mac=…``) when its
``network`` is ``"outbound"`` or it publishes ports; otherwise it has none (only ``lo``). The NIC's
MAC is derived from the box id (locally administered, unicast: ``02:…``). The guest side is static,
on the kernel command line (``hutch.net=ADDR/PREFIX[,GATEWAY[,DNS]]``); the agent configures
``eth0`` at boot:

* ``"outbound"``: ``10.0.2.15/24``, default route via ``10.0.2.2``, and ``/etc/resolv.conf`` =
  ``nameserver 10.0.2.3`` (slirp's DNS, which asks the host's resolvers) *if the image has none or an
  empty one* — a non-empty file or a symlink in the image is left as it is. Connections to
  ``10.0.2.2`` reach the **host's loopback** services (slirp's NAT maps the gateway to the host's
  127.0.0.1): that is how a box talks to a server on the host, and also why ``outbound`` is not an
  isolation boundary for local services (see the egress design in docs/ARCHITECTURE.md).
* ``"none"`` with published ports: the netdev is ``restrict=on`` — slirp drops every packet the
  guest sends that is not part of a forwarded TCP connection, so TCP ports work and nothing else
  does; the guest gets ``10.0.2.15/24`` only (no route, no DNS), so connecting anywhere fails at
  once. Restricted slirp drops *all* guest UDP, replies to forwarded datagrams included: UDP ports
  need ``"outbound"`` (:func:`check_ports` says so at start).

Published ports are slirp ``hostfwd=tcp|udp:HOST_IP:HOSTPORT-:GUESTPORT`` rules (QEMU 7.2 forwards
IPv4 host addresses only). Before QEMU starts, every fixed host port is bound once on the host
(:func:`check_ports`), so a taken one is a :class:`~hutch.errors.ConflictError` naming it; QEMU's
own "could not set up host forwarding rule" (someone took the port in between) is mapped to the
same error (:func:`forward_failure`). Host port 0 is given to QEMU as 0: the kernel picks a free
port when slirp binds it — no race — and :func:`published_ports` reads the ports QEMU got back
(QMP ``info usernet``).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hutch.errors import ConfigError, ConflictError, EngineError
from hutch.runtime.options import BoxOptions, Port
from hutch.vm import egress

GUEST_IP = "10.0.2.15"
PREFIX = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
NETDEV_ID = "net0"

_FORWARD_FAILED = re.compile(
    r"Could not set up host forwarding rule '(tcp|udp):([0-9.]*):(\d+)-[^']*'", re.IGNORECASE
)


def mac_for(box_id: str) -> str:
    """A stable MAC for a box: ``02:`` (locally administered, unicast) + 5 bytes of a hash."""
    digest = hashlib.sha256(b"hutch-nic:" + box_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def hostfwd(port: Port) -> str:
    return f"{port.protocol}:{port.host_ip}:{port.host}-:{port.guest}"


@dataclass(frozen=True)
class NetworkPlan:
    """The NIC of one box: its mode, forwards and MAC."""

    mode: str
    ports: tuple[Port, ...]
    mac: str
    #: allowlist: the proxy's Unix socket the guestfwd relay joins (see :mod:`hutch.vm.egress`).
    proxy_socket: Path | None = None

    @property
    def restricted(self) -> bool:
        return self.mode != "outbound"

    def qemu_args(self) -> list[str]:
        netdev = [
            "user",
            f"id={NETDEV_ID}",
            f"restrict={'on' if self.restricted else 'off'}",
            "ipv6=off",  # the guest kernel has no IPv6
            *(f"hostfwd={hostfwd(p)}" for p in self.ports),
        ]
        if self.proxy_socket is not None:
            relay = egress.relay_command(self.proxy_socket)
            netdev.append(f"guestfwd=tcp:{egress.PROXY_ADDR}:{egress.PROXY_PORT}-cmd:{relay}")
        return [
            "-netdev",
            ",".join(netdev),
            "-device",
            f"virtio-net-device,netdev={NETDEV_ID},mac={self.mac}",
        ]

    def kernel_args(self) -> list[str]:
        if self.restricted:
            return [f"hutch.net={GUEST_IP}/{PREFIX}"]
        return [f"hutch.net={GUEST_IP}/{PREFIX},{GATEWAY},{DNS}"]


def plan(options: BoxOptions, box_id: str, run_dir: Path) -> NetworkPlan | None:
    """The box's NIC, or None when it needs none (network "none" and no published ports)."""
    if options.network == "none" and not options.ports:
        return None
    sock = run_dir / egress.SOCKET_NAME if options.network == "allowlist" else None
    return NetworkPlan(options.network, tuple(options.ports), mac_for(box_id), sock)


def _where(ports: Sequence[Port], port: Port) -> str:
    return f"ports[{list(ports).index(port)}]" if port in ports else "port"


def port_conflict(port: Port, where: str = "port") -> ConflictError:
    return ConflictError(
        f"host port {port.host_ip}:{port.host}/{port.protocol} ({where}, for guest port "
        f"{port.guest}) is already in use",
        hint="Pick another host port, or 0 to have a free one picked (box.ports reports it); "
        "`ss -lntup` shows who holds this one.",
    )


def check_ports(ports: Sequence[Port], mode: str = "outbound") -> None:
    """Refuse what slirp cannot forward (IPv6 host addresses; UDP on a restricted netdev) and
    fixed host ports that are taken or cannot be bound here — before QEMU starts, with the port
    named."""
    for i, port in enumerate(ports):
        where = f"ports[{i}]"
        if port.protocol == "udp" and mode != "outbound":
            raise ConfigError(
                f"{where} publishes UDP port {port.guest}, which needs network='outbound': "
                "QEMU's restricted user-mode network (network 'none') drops every UDP packet "
                "the guest sends, replies included",
                hint="Create the box with network='outbound', or publish TCP ports only.",
            )
        if ipaddress.ip_address(port.host_ip).version != 4:
            raise ConfigError(
                f"{where}.host_ip must be an IPv4 address, not {port.host_ip!r}: QEMU's user-mode "
                "network forwards IPv4 host addresses only",
                hint="Use 127.0.0.1 (this host only) or 0.0.0.0 (every interface).",
            )
        if port.host == 0:
            continue  # slirp binds port 0: the kernel picks, no race
        kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:  # as slirp does: TIME_WAIT leftovers do not count
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((port.host_ip, port.host))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise port_conflict(port, where) from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(
                        f"{where}.host_ip {port.host_ip} is not an address of this host",
                        hint="Use 127.0.0.1, 0.0.0.0 or one of this host's addresses.",
                    ) from None
                if e.errno == errno.EACCES:
                    raise ConfigError(
                        f"{where}.host {port.host}: this user may not bind ports below 1024",
                        hint="Use a port >= 1024 (or lower net.ipv4.ip_unprivileged_port_start).",
                    ) from None
                raise ConfigError(
                    f"{where}: cannot bind host port {port.host_ip}:{port.host}/"
                    f"{port.protocol}: {e.strerror}"
                ) from None


def forward_failure(qemu_output: str, ports: Sequence[Port]) -> ConflictError | None:
    """QEMU's "Could not set up host forwarding rule 'tcp:IP:PORT-:G'" (the port was taken after
    :func:`check_ports`) as a ConflictError naming the port, else None."""
    m = _FORWARD_FAILED.search(qemu_output)
    if m is None:
        return None
    proto, ip, host = m.group(1).lower(), m.group(2) or "0.0.0.0", int(m.group(3))
    for port in ports:
        if (port.protocol, port.host_ip, port.host) == (proto, ip, host):
            return port_conflict(port, _where(ports, port))
    return port_conflict(Port(host, 1, proto, ip))  # type: ignore[arg-type]


def parse_usernet(text: str) -> list[tuple[str, str, int, int]]:
    """The host forwards of HMP ``info usernet``: (protocol, host address, host port, guest
    port); the address ``*`` is 0.0.0.0."""
    rows = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or not cols[0].endswith("[HOST_FORWARD]"):
            continue
        proto = cols[0].split("[", 1)[0].lower()
        try:
            host_port, guest_port = int(cols[3]), int(cols[5])
        except ValueError:
            continue
        rows.append((proto, "0.0.0.0" if cols[2] == "*" else cols[2], host_port, guest_port))
    return rows


def resolve_ports(ports: Sequence[Port], usernet: str) -> tuple[Port, ...]:
    """``ports`` with each host port 0 replaced by the port QEMU bound (from ``info usernet``)."""
    rows = parse_usernet(usernet)
    out = []
    for port in ports:
        if port.host == 0:
            found = [r for r in rows if (r[0], r[3]) == (port.protocol, port.guest)]
            if len(found) != 1 or found[0][2] == 0:
                raise EngineError(
                    f"could not find the host port QEMU picked for guest port "
                    f"{port.guest}/{port.protocol} in:\n{usernet.strip()}"
                )
            port = replace(port, host=found[0][2])
        out.append(port)
    return tuple(out)


__all__ = [
    "DNS",
    "GATEWAY",
    "GUEST_IP",
    "NetworkPlan",
    "check_ports",
    "forward_failure",
    "hostfwd",
    "mac_for",
    "parse_usernet",
    "plan",
    "port_conflict",
    "resolve_ports",
]
