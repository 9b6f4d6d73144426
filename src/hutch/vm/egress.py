"""``network="allowlist"``: the guest reaches only what ``allow`` lists, through a filtering proxy
on the host (docs/ARCHITECTURE.md, *Egress allow-list*).

The NIC is slirp with ``restrict=on`` (the guest can open no connection of its own) plus one
``guestfwd`` rule: a connection to :data:`PROXY_ADDR` runs :mod:`hutch.vm.egress_relay`, which
joins it to this module's :class:`EgressProxy` on a Unix socket in the box's run folder. The
proxy speaks HTTP ``CONNECT host:port`` (HTTPS and any TLS) and absolute-form plain HTTP
(``GET http://host/…``); every command in the box gets ``HTTP_PROXY``/``HTTPS_PROXY`` pointing at
it, and the guest has no resolver: names are resolved here.

A destination is allowed when its host name matches an ``allow`` pattern (``pypi.org``, or
``*.example.com`` for the subdomains of example.com) or *every* address it resolves to lies in an
allowed CIDR. Loopback, link-local, unspecified and multicast addresses, and this host's own
addresses, are refused unless a CIDR lists them or the exact name was listed — so the host's
loopback services at 10.0.2.2 are no surprise. The proxy connects to an address it checked (no
DNS rebinding between check and connect). Everything the guest sends is bounded: the request head
(:data:`MAX_HEAD`), the time to send it, name resolution and connecting. A refusal is a ``403``
with the reason; each decision is logged (logger ``hutch.egress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import logging
import os
import re
import shlex
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from hutch.errors import ConfigError

log = logging.getLogger("hutch.egress")

#: Where the guest finds the proxy (inside slirp's 10.0.2.0/24).
PROXY_ADDR = "10.0.2.100"
PROXY_PORT = 3128
PROXY_URL = f"http://{PROXY_ADDR}:{PROXY_PORT}"
#: The proxy's socket, in the box's run folder.
SOCKET_NAME = "egress.sock"
#: Largest request head the guest may send; time to send it; to resolve; to connect.
MAX_HEAD = 16 << 10
HEAD_TIMEOUT = 15.0
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
#: Most patterns one box may list.
MAX_ALLOW = 256

_HOSTNAME = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def proxy_env() -> dict[str, str]:
    """The environment every command of an allowlist box starts from (the user's env wins)."""
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = PROXY_URL
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
    return env


@dataclass(frozen=True)
class AllowList:
    """Parsed ``allow`` patterns: CIDRs, exact host names and ``*.suffix`` wildcards."""

    networks: tuple[_Net, ...]
    names: frozenset[str]
    wildcards: tuple[str, ...]

    @classmethod
    def parse(cls, patterns: Iterable[str], field_name: str = "allow") -> AllowList:
        nets: list[_Net] = []
        names: set[str] = set()
        wild: list[str] = []
        items = list(patterns)
        if len(items) > MAX_ALLOW:
            raise ConfigError(f"{field_name} lists {len(items)} patterns; at most {MAX_ALLOW}")
        for i, raw in enumerate(items):
            if not isinstance(raw, str) or not raw.strip():
                raise ConfigError(f"{field_name}[{i}] must be a CIDR or a host name, not {raw!r}")
            text = raw.strip().lower().rstrip(".")
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if len(text) > 253 or not _HOSTNAME.match(text):
                raise ConfigError(
                    f"{field_name}[{i}] {raw!r} is neither a CIDR nor a host name",
                    hint="Use e.g. '10.1.0.0/16', '192.0.2.7', 'pypi.org' or '*.example.com'.",
                )
            if text.startswith("*."):
                wild.append(text)
            else:
                names.add(text)
        return cls(tuple(nets), frozenset(names), tuple(wild))

    def name_listed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return h in self.names or any(fnmatch.fnmatchcase(h, w) for w in self.wildcards)

    def in_networks(self, addr: _Addr) -> bool:
        return any(addr in net for net in self.networks)

    def decide(self, host: str, addrs: Sequence[_Addr], own: frozenset[_Addr]) -> str | None:
        """None if a connection to ``host`` (resolved to ``addrs``) is allowed, else why not."""
        if not addrs:
            return f"{host} does not resolve"
        exact = host.lower().rstrip(".") in self.names
        by_name = self.name_listed(host)
        for addr in addrs:
            special = (
                addr.is_loopback
                or addr.is_link_local
                or addr.is_unspecified
                or addr.is_multicast
                or addr in own
            )
            if special and not (exact or self.in_networks(addr)):
                return f"{host} is {addr}, a local address, which is not listed"
            if not (by_name or self.in_networks(addr)):
                return f"{host} ({addr}) is not in the allow list"
        return None


def own_addresses() -> frozenset[_Addr]:
    """This host's interface addresses (a guest must not reach host services by them)."""
    import fcntl
    import struct

    found: set[_Addr] = set()
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                req = struct.pack("256s", name.encode()[:15])
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, req)
                found.add(ipaddress.ip_address(socket.inet_ntoa(raw[20:24])))
    return frozenset(found)


def relay_command(sock: Path) -> str:
    """The ``guestfwd`` command QEMU runs per guest connection (stdin/stdout = the connection).
    The venv's Python in isolated mode without ``site`` starts in ~15 ms, and needs nothing
    that ``hutch setup`` does not already have (socat would be one more package)."""
    relay = Path(__file__).with_name("egress_relay.py")
    cmd = " ".join(shlex.quote(str(p)) for p in (sys.executable, "-I", "-S", relay, sock))
    if "," in cmd:
        raise ConfigError(
            f"the egress relay command holds a comma, which QEMU's -netdev cannot take: {cmd}",
            hint="Use a hutch home and Python installation whose paths have no commas.",
        )
    return cmd


class _Refused(Exception):
    pass


class EgressProxy:
    """The filtering proxy of one box, on a Unix socket (see the module docstring)."""

    def __init__(self, allow: AllowList, box_id: str) -> None:
        self.allow = allow
        self.box_id = box_id
        self._server: asyncio.AbstractServer | None = None
        self._own = own_addresses()
        self._conns: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, path: Path, allow: AllowList, box_id: str) -> EgressProxy:
        proxy = cls(allow, box_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        proxy._server = await asyncio.start_unix_server(proxy._serve, path, limit=MAX_HEAD)
        os.chmod(path, 0o600)
        return proxy

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            await self._handle(reader, writer)
        except (_Refused, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refuse(self, writer: asyncio.StreamWriter, status: str, why: str) -> NoReturn:
        log.info("box %s: egress refused: %s", self.box_id, why)
        body = f"hutch egress: {why}\n".encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        raise _Refused(why)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            await self._refuse(
                writer, "431 Request Header Fields Too Large", "request head too large"
            )
        except TimeoutError:
            await self._refuse(writer, "408 Request Timeout", "request head not sent in time")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._refuse(writer, "400 Bad Request", "not an HTTP/1 proxy request")
        method, target, version = parts
        rest = b""
        if method == "CONNECT":
            host, port = _split_host_port(target, None)
        else:
            m = re.match(r"^http://([^/?#]+)([^#]*)$", target, re.IGNORECASE)
            if m is None:
                await self._refuse(
                    writer, "400 Bad Request", "only CONNECT and absolute http:// requests"
                )
            host, port = _split_host_port(m.group(1), 80)
            path = m.group(2) or "/"
            kept = [
                line
                for line in lines[1:]
                if line
                and not line.lower().startswith(("proxy-connection:", "proxy-authorization:"))
            ]
            rest = ("\r\n".join([f"{method} {path} {version}", *kept]) + "\r\n\r\n").encode(
                "latin-1"
            )
        if host is None or port is None:
            await self._refuse(writer, "400 Bad Request", f"bad target {target[:100]!r}")
        if not self.allow.networks and not self.allow.name_listed(host):
            await self._refuse(writer, "403 Forbidden", f"{host} is not in the allow list")
        addrs = await self._resolve(host, port, writer)
        why = self.allow.decide(host, addrs, self._own)
        if why is not None:
            await self._refuse(writer, "403 Forbidden", why)
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(str(addrs[0]), port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            await self._refuse(writer, "502 Bad Gateway", f"cannot connect to {host}:{port}: {e}")
        log.info("box %s: egress to %s:%d (%s) allowed", self.box_id, host, port, addrs[0])
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_w.write(rest)
        await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer), return_exceptions=True)
        up_w.close()

    async def _resolve(self, host: str, port: int, writer: asyncio.StreamWriter) -> list[_Addr]:
        with contextlib.suppress(ValueError):
            return [ipaddress.ip_address(host.strip("[]"))]
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, family=socket.AF_INET
                ),
                RESOLVE_TIMEOUT,
            )
        except (OSError, TimeoutError) as e:
            await self._refuse(writer, "502 Bad Gateway", f"cannot resolve {host}: {e}")
        return list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))


def _split_host_port(text: str, default: int | None) -> tuple[str | None, int | None]:
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port_num = text, default
    else:
        try:
            port_num = int(port)
        except ValueError:
            return None, None
    if port_num is None or not 0 < port_num < 65536 or not host:
        return None, None
    return host, port_num


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    finally:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()
