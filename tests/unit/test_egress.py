"""The egress allow-list and its filtering proxy (hutch.vm.egress) against real local TCP servers,
without a VM: pattern parsing, decisions, CONNECT and plain-HTTP relaying, refusals, bounds."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hutch.errors import ConfigError
from hutch.vm.egress import MAX_HEAD, AllowList, EgressProxy

A = ipaddress.ip_address


def test_patterns_are_parsed_and_validated() -> None:
    allow = AllowList.parse(["10.1.0.0/16", "192.0.2.7", "PyPI.org.", "*.example.com"])
    assert [str(n) for n in allow.networks] == ["10.1.0.0/16", "192.0.2.7/32"]
    assert allow.names == {"pypi.org"} and allow.wildcards == ("*.example.com",)
    for bad in ("", "bad host", "a..b", "*", "x" * 300, "http://pypi.org"):
        with pytest.raises(ConfigError):
            AllowList.parse([bad])


def test_decisions() -> None:
    allow = AllowList.parse(["10.1.0.0/16", "pypi.org", "*.example.com", "localhost"])
    own = frozenset({A("192.0.2.2")})
    assert allow.decide("10.1.2.3", [A("10.1.2.3")], own) is None
    assert allow.decide("pypi.org", [A("151.101.0.223")], own) is None
    assert allow.decide("files.example.com", [A("93.184.216.34")], own) is None
    assert allow.decide("localhost", [A("127.0.0.1")], own) is None  # listed exactly
    assert "not in the allow list" in (allow.decide("evil.org", [A("10.2.0.1")], own) or "")
    assert "example.com" not in allow.names and allow.decide("example.com", [A("1.2.3.4")], own)
    # a wildcard name resolving to a local address, or the host's own address: refused
    assert "local address" in (allow.decide("x.example.com", [A("127.0.0.1")], own) or "")
    assert "local address" in (allow.decide("x.example.com", [A("192.0.2.2")], own) or "")
    # every address must pass, not one of them
    assert allow.decide("mixed", [A("10.1.0.1"), A("10.9.0.1")], own) is not None
    assert allow.decide("nothing", [], own) is not None


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        if data.startswith(b"GET "):
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + data.split(b"\r\n")[0])
        else:
            writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def ask(sock: Path, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


async def test_proxy_relays_allowed_and_refuses_the_rest(tmp_path: Path, upstream: int) -> None:
    sock = tmp_path / "egress.sock"
    proxy = await EgressProxy.start(sock, AllowList.parse(["127.0.0.0/8"]), "test")
    try:
        out = await ask(sock, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\nhello" % upstream)
        assert out == b"HTTP/1.1 200 Connection established\r\n\r\necho:hello"
        req = b"GET http://127.0.0.1:%d/p?q=1 HTTP/1.1\r\nProxy-Connection: x\r\n\r\n" % upstream
        out = await ask(sock, req)
        assert out.endswith(b"GET /p?q=1 HTTP/1.1")  # origin-form upstream
        out = await ask(sock, b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403") and b"not in the allow list" in out
        out = await ask(sock, b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400")
        out = await ask(sock, b"GET /relative HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400")
        out = await ask(sock, b"CONNECT a:1 HTTP/1.1\r\nX: " + b"y" * MAX_HEAD + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431")
    finally:
        await proxy.close()
