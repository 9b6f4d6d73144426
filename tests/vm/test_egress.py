"""``network="allowlist"`` with a real guest: what ``allow`` lists answers through the host's
filtering proxy (by CIDR and by name), the rest gets 403, and the guest cannot go around the proxy
(no direct connection, the host's loopback at 10.0.2.2 not reachable)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import hutch
from hutch.errors import ConfigError
from hutch.vm.egress import own_addresses
from tests.support.homes import make_home

pytestmark = pytest.mark.vm


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def servers() -> AsyncIterator[dict[str, int]]:
    """Two tiny HTTP servers on the host: one on loopback, one on another host address."""

    def handler(tag: bytes):  # type: ignore[no-untyped-def]
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(tag), tag))
            await writer.drain()
            writer.close()

        return answer

    other = next((str(a) for a in own_addresses() if not a.is_loopback), None)
    if other is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    loop_srv = await asyncio.start_server(handler(b"loopback"), "127.0.0.1", 0)
    other_srv = await asyncio.start_server(handler(b"other"), other, 0)
    async with loop_srv, other_srv:
        yield {
            "loop": loop_srv.sockets[0].getsockname()[1],
            "other": other_srv.sockets[0].getsockname()[1],
            "other_addr": other,  # type: ignore[dict-item]
        }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def box(
    tmp_path_factory: pytest.TempPathFactory, servers: dict[str, int]
) -> AsyncIterator[hutch.Box]:
    home = make_home(tmp_path_factory.mktemp("egress") / "home")
    async with hutch.Runtime(home) as rt:
        b = await rt.create(
            image="busybox", network="allowlist", allow=[f"{servers['other_addr']}/32", "localhost"]
        )
        await b.start()
        try:
            yield b
        finally:
            await rt.remove(b.id, force=True)


async def wget(box: hutch.Box, url: str, *extra: str) -> hutch.ExecResult:
    return await box.exec("wget", "-q", "-O", "-", *extra, url, timeout=60)


async def through_proxy(box: hutch.Box, request: str) -> str:
    """An HTTP request sent to the proxy as is (what any proxy-aware tool sends)."""
    script = f"(printf '{request}\\r\\n\\r\\n'; sleep 2) | nc 10.0.2.100 3128"
    return (await box.exec("sh", "-c", script, timeout=60)).stdout


async def test_listed_destinations_answer(box: hutch.Box, servers: dict[str, int]) -> None:
    url = f"http://{servers['other_addr']}:{servers['other']}/"
    r = await wget(box, url)  # listed by CIDR; wget finds the proxy in http_proxy
    assert (r.exit_code, r.stdout) == (0, "other"), r.stderr
    # listed by name: the host's own loopback, only because "localhost" is listed exactly
    out = await through_proxy(box, f"GET http://localhost:{servers['loop']}/ HTTP/1.0")
    assert out.startswith("HTTP/1.0 200") and out.endswith("loopback"), out
    out = await through_proxy(box, f"CONNECT localhost:{servers['loop']} HTTP/1.1")
    assert out.startswith("HTTP/1.1 200 Connection established"), out
    env = (await box.exec("env")).stdout
    assert "http_proxy=http://10.0.2.100:3128" in env


async def test_unlisted_destinations_are_refused(box: hutch.Box, servers: dict[str, int]) -> None:
    # the host's loopback by address: a local address, not listed by CIDR
    out = await through_proxy(box, f"GET http://127.0.0.1:{servers['loop']}/ HTTP/1.0")
    assert out.startswith("HTTP/1.1 403") and "local address" in out, out
    r = await wget(box, f"http://10.0.2.2:{servers['loop']}/")  # slirp's host alias, unlisted
    assert r.exit_code != 0 and "403" in r.stderr, r.stderr
    out = await through_proxy(box, f"CONNECT 198.51.100.7:{servers['other']} HTTP/1.1")
    assert out.startswith("HTTP/1.1 403") and "not in the allow list" in out, out
    out = await through_proxy(box, "BREW coffee HTTP/1.1")
    assert out.startswith("HTTP/1.1 400"), out


async def test_the_proxy_cannot_be_bypassed(box: hutch.Box, servers: dict[str, int]) -> None:
    for url in (
        f"http://10.0.2.2:{servers['loop']}/",  # the host's loopback through slirp
        f"http://{servers['other_addr']}:{servers['other']}/",
    ):
        r = await wget(box, url, "-Y", "off")  # no proxy: a direct connection
        assert r.exit_code != 0, (url, r.stdout)
    # no resolver either: slirp's DNS (10.0.2.3) does not answer a restricted guest
    r = await box.exec("nslookup", "-timeout=2", "-retry=1", "localhost", "10.0.2.3", timeout=60)
    assert r.exit_code != 0, r.stdout


async def test_a_clone_gets_its_own_proxy(box: hutch.Box, servers: dict[str, int]) -> None:
    clone = await box.clone()
    try:
        url = f"http://{servers['other_addr']}:{servers['other']}/"
        r = await wget(clone, url)
        assert (r.exit_code, r.stdout) == (0, "other"), r.stderr
        r = await wget(clone, f"http://10.0.2.2:{servers['loop']}/")
        assert r.exit_code != 0 and "403" in r.stderr, r.stderr
    finally:
        await clone.remove()


async def test_allow_is_validated() -> None:
    with pytest.raises(ConfigError, match="needs allow"):
        hutch.BoxOptions(network="allowlist")
    with pytest.raises(ConfigError, match="neither a CIDR nor a host name"):
        hutch.BoxOptions(network="allowlist", allow=["bad host!"])
    with pytest.raises(ConfigError, match="only for network='allowlist'"):
        hutch.BoxOptions(network="outbound", allow=["10.0.0.0/8"])
