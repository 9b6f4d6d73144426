"""The real agent binary, in its host test mode (``--portal-socket``), against the real host channel.

Fast protocol coverage without QEMU; the same behaviour is checked inside a real guest in tests/vm.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hutch.errors import NotFoundError
from hutch.execution import Execution
from hutch.portal import PortalChannel, SpawnRequest


class AgentOnHost:
    def __init__(self, channel: PortalChannel, proc: asyncio.subprocess.Process) -> None:
        self.channel = channel
        self.proc = proc

    async def spawn(
        self,
        *argv: str,
        stdin: bool = False,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        tty: tuple[int, int] | None = None,
    ) -> Execution:
        req = SpawnRequest(
            argv,
            env=list((env or {}).items()),
            cwd=cwd,
            stdin=stdin,
            timeout_ms=int(timeout * 1000) if timeout else 0,
            tty=tty,
        )
        stream = await self.channel.spawn(req)
        pid = await asyncio.wait_for(stream.started, 10)
        return Execution(stream, pid, timeout, 1 << 30, tty=tty is not None)


@pytest_asyncio.fixture(loop_scope="session")
async def agent(agent_binary: Path) -> AsyncIterator[AgentOnHost]:
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "portal.sock")
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.set_result((r, w))

        server = await asyncio.start_unix_server(on_conn, sock)
        proc = await asyncio.create_subprocess_exec(str(agent_binary), "--portal-socket", sock)
        r, w = await asyncio.wait_for(accepted, 10)
        channel = PortalChannel(r, w)
        hello = await asyncio.wait_for(channel.wait_hello(), 10)
        assert hello.version == 1 and hello.agent
        try:
            yield AgentOnHost(channel, proc)
        finally:
            await channel.shutdown()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            await channel.close()
            server.close()


async def test_exit_code_and_streams(agent: AgentOnHost) -> None:
    ex = await agent.spawn("sh", "-c", "echo out; echo err >&2; exit 7")
    r = await ex.wait()
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\n", "err\n")


async def test_env_cwd(agent: AgentOnHost) -> None:
    r = await (await agent.spawn("sh", "-c", 'echo "$A:$PWD"', env={"A": "1"}, cwd="/tmp")).wait()
    assert r.stdout == "1:/tmp\n"


async def test_timeout_and_signal(agent: AgentOnHost) -> None:
    ex = await agent.spawn("sleep", "30", timeout=0.3)
    with pytest.raises(TimeoutError):
        await ex.wait()
    ex = await agent.spawn("sleep", "30")
    await ex.signal(signal.SIGTERM)
    assert (await ex.wait()).signal == signal.SIGTERM


async def test_missing_program(agent: AgentOnHost) -> None:
    stream = await agent.channel.spawn(SpawnRequest(["/no/such/prog"]))
    with pytest.raises(NotFoundError):
        await asyncio.wait_for(stream.started, 10)


async def test_stdin_and_large_output_with_flow_control(agent: AgentOnHost) -> None:
    data = os.urandom(3 << 20)
    ex = await agent.spawn("cat", stdin=True)

    async def feed() -> None:
        await ex.stdin.write(data)
        await ex.stdin.close()

    feeder = asyncio.create_task(feed())
    r = await ex.wait()
    await feeder
    assert hashlib.sha256(r.stdout_bytes).digest() == hashlib.sha256(data).digest()


async def test_concurrent(agent: AgentOnHost) -> None:
    async def one(i: int) -> str:
        return (await (await agent.spawn("sh", "-c", f"sleep 0.1; echo {i}")).wait()).stdout

    assert await asyncio.gather(*(one(i) for i in range(30))) == [f"{i}\n" for i in range(30)]


async def test_ping(agent: AgentOnHost) -> None:
    assert 0 < await agent.channel.ping() < 5


async def test_terminal_size_resize_and_end_of_input(agent: AgentOnHost) -> None:
    r = await (await agent.spawn("sh", "-c", "stty size; echo e >&2", tty=(33, 77))).wait()
    assert (r.stdout, r.stderr) == ("33 77\r\ne\r\n", "")  # one stream, as a terminal shows it
    ex = await agent.spawn("sh", "-c", "read a; stty size; cat", tty=(10, 20))
    await ex.resize(11, 22)
    await ex.stdin.write(b"go\n")
    seen = b""
    while b"11 22\r\n" not in seen:
        chunk = await asyncio.wait_for(ex.stdout.read_chunk(), 10)
        assert chunk, seen
        seen += chunk
    assert seen == b"go\r\n11 22\r\n"
    await ex.stdin.write(b"tail")  # a partial line, then the end: cat gets "tail", then EOF
    await ex.stdin.close()
    r = await asyncio.wait_for(ex.wait(), 10)
    assert r.exit_code == 0 and r.stdout == "tailtail", r  # the echo, then cat's copy


async def test_malformed_resize_is_ignored(agent: AgentOnHost) -> None:
    from hutch.portal.codec import Frame, MsgType, Tag, encode_tlv

    ex = await agent.spawn("sh", "-c", "read a; stty size", tty=(5, 6))
    for bad in (encode_tlv([(Tag.ROWS, 0), (Tag.COLS, 9)]), encode_tlv([(Tag.ROWS, 9)]), b"\x01"):
        await agent.channel._send(Frame(MsgType.RESIZE, ex.id, bad))
    await ex.stdin.write(b"\n")
    assert (await asyncio.wait_for(ex.wait(), 10)).stdout.endswith("5 6\r\n")
