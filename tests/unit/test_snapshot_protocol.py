"""FREEZE/FROZEN/THAW/RESTORE (protocol 1.1): the real agent in its host test mode, and a scripted
guest for what a real agent never sends. In test mode the agent runs the protocol part of RESTORE
(drop held output, detach processes, HELLO with the nonce) but never touches the host's RNG,
clock or hostname."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hutch.errors import BadRequestError, PortalError
from hutch.execution import Execution
from hutch.portal import Identity, PortalChannel, SpawnRequest
from hutch.portal.codec import (
    NONCE_LEN,
    PROTOCOL_MINOR,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    decode_tlv,
    encode_tlv,
)


class Agent:
    def __init__(self, proc: asyncio.subprocess.Process, sock: str) -> None:
        self.proc = proc
        self.sock = sock


@pytest_asyncio.fixture(loop_scope="session")
async def agent_conn(
    agent_binary: Path,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, asyncio.StreamReader, asyncio.StreamWriter]]:
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
        try:
            yield proc, r, w
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            server.close()


async def run(channel: PortalChannel, *argv: str, stdin: bool = False) -> Execution:
    stream = await channel.spawn(SpawnRequest(argv, stdin=stdin))
    pid = await asyncio.wait_for(stream.started, 10)
    return Execution(stream, pid, None, 1 << 30)


async def test_hello_announces_minor_version(agent_conn) -> None:  # type: ignore[no-untyped-def]
    _, r, w = agent_conn
    channel = PortalChannel(r, w)
    hello = await asyncio.wait_for(channel.wait_hello(), 10)
    assert (hello.version, hello.minor, hello.nonce) == (1, PROTOCOL_MINOR, None)
    await channel.close()


async def test_freeze_holds_output_until_thaw(agent_conn) -> None:  # type: ignore[no-untyped-def]
    _, r, w = agent_conn
    channel = PortalChannel(r, w)
    await asyncio.wait_for(channel.wait_hello(), 10)
    ex = await run(channel, "sh", "-c", "read x; echo got-$x; sleep 0.2; echo after", stdin=True)
    await channel.freeze(5)
    # While frozen the host holds what it sends: stdin waits until thaw.
    writer = asyncio.create_task(ex.stdin.write(b"line\n"))
    await asyncio.sleep(0.3)
    assert not writer.done()
    assert ex._proc.queues[1].empty()
    channel.thaw()
    await asyncio.wait_for(writer, 5)
    await ex.stdin.close()
    result = await asyncio.wait_for(ex.wait(), 10)
    assert result.stdout == "got-line\nafter\n"
    await channel.close()


async def test_output_produced_while_frozen_arrives_after_thaw(agent_conn) -> None:  # type: ignore[no-untyped-def]
    _, r, w = agent_conn
    channel = PortalChannel(r, w)
    await asyncio.wait_for(channel.wait_hello(), 10)
    ex = await run(channel, "sh", "-c", "sleep 0.3; echo late")
    await channel.freeze(5)
    await asyncio.sleep(0.8)  # the process printed and exited meanwhile
    assert ex._proc.queues[1].empty() and not ex._proc.exited.done()
    channel.thaw(1_700_000_000 * 10**9)  # a clock in THAW: test mode leaves the host's alone
    result = await asyncio.wait_for(ex.wait(), 10)
    assert (result.stdout, result.exit_code) == ("late\n", 0)
    assert 0 < await asyncio.wait_for(channel.ping(), 5) < 5
    await channel.close()


async def test_restore_handshake_detaches_old_processes(agent_conn) -> None:  # type: ignore[no-untyped-def]
    proc, r, w = agent_conn
    # As a clone's host: the agent's first (plain) HELLO is not the handshake.
    channel = PortalChannel(r, w, restoring=True)
    await asyncio.sleep(0.2)
    assert not channel.hello.done()
    identity = Identity(hostname="clone-1")
    await channel.restore(identity)
    hello = await asyncio.wait_for(channel.wait_hello(), 10)
    assert hello.nonce == identity.nonce and hello.minor == PROTOCOL_MINOR
    ex = await run(channel, "sh", "-c", "echo $HOSTNAME-ok")
    assert (await asyncio.wait_for(ex.wait(), 10)).stdout.endswith("-ok\n")
    with pytest.raises(PortalError, match="once"):
        await channel.restore(identity)
    await channel.shutdown()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    await channel.close()


async def test_restore_with_a_new_nonce_detaches_streams(agent_conn) -> None:  # type: ignore[no-untyped-def]
    """A second RESTORE (a clone of a clone) detaches the processes of the previous host."""
    proc, r, w = agent_conn
    dec = FrameDecoder(frozenset(MsgType))

    async def frames_until(kind: MsgType) -> list[Frame]:
        got: list[Frame] = []
        while not any(f.type is kind for f in got):
            got += dec.feed(await asyncio.wait_for(r.read(65536), 10))
        return got

    await frames_until(MsgType.HELLO)
    spawn = encode_tlv([(Tag.ARG, "sleep"), (Tag.ARG, "5"), (Tag.STDIN, 0)])
    w.write(Frame(MsgType.SPAWN, 1, spawn).encode())
    await frames_until(MsgType.STARTED)
    w.write(Frame(MsgType.FREEZE, 0).encode())
    await frames_until(MsgType.FROZEN)
    nonce = os.urandom(NONCE_LEN)
    restore = encode_tlv([(Tag.NONCE, nonce), (Tag.HOSTNAME, "x")])
    w.write(Frame(MsgType.RESTORE, 0, restore).encode())
    got = await frames_until(MsgType.HELLO)
    hello = next(f for f in got if f.type is MsgType.HELLO)
    assert decode_tlv(hello.payload).all(Tag.NONCE) == [nonce]
    # The same RESTORE again (a host that feared it lost) is only answered, nothing is reset.
    w.write(Frame(MsgType.RESTORE, 0, restore).encode())
    got = await frames_until(MsgType.HELLO)
    # Stream 1 belongs to the old host now: a SIGNAL for it is ignored, and a new stream 1 works.
    w.write(Frame(MsgType.SPAWN, 1, encode_tlv([(Tag.ARG, "true")])).encode())
    got = await frames_until(MsgType.EXIT)
    exit_frame = next(f for f in got if f.type is MsgType.EXIT)
    assert exit_frame.stream == 1
    assert decode_tlv(exit_frame.payload).u(Tag.EXIT_CODE) == 0
    w.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_malformed_restore_is_ignored(agent_conn) -> None:  # type: ignore[no-untyped-def]
    _, r, w = agent_conn
    channel = PortalChannel(r, w)
    await asyncio.wait_for(channel.wait_hello(), 10)
    # A nonce of the wrong length: the agent logs and ignores it (no HELLO, no reset).
    channel._send_raw(
        Frame(MsgType.RESTORE, 0, encode_tlv([(Tag.NONCE, b"short"), (Tag.HOSTNAME, "x")]))
    )
    assert 0 < await asyncio.wait_for(channel.ping(), 5) < 5
    ex = await run(channel, "echo", "fine")
    assert (await asyncio.wait_for(ex.wait(), 10)).stdout == "fine\n"
    await channel.close()


# --- scripted guests -------------------------------------------------------------------------
def hello_frame(nonce: bytes | None = None, minor: int = 1) -> bytes:
    tlv: list[tuple[Tag, int | str | bytes]] = [(Tag.VERSION, 1), (Tag.MINOR, minor)]
    if nonce is not None:
        tlv.append((Tag.NONCE, nonce))
    return Frame(MsgType.HELLO, 0, encode_tlv(tlv)).encode()


async def pair(
    restoring: bool = False,
) -> tuple[PortalChannel, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    r, w = await asyncio.open_connection(sock=a)
    gr, gw = await asyncio.open_connection(sock=b)
    return PortalChannel(r, w, restoring=restoring), gr, gw


async def read_frames(reader: asyncio.StreamReader, n: int) -> list[Frame]:
    dec = FrameDecoder(frozenset(MsgType))
    frames: list[Frame] = []
    while len(frames) < n:
        frames += dec.feed(await asyncio.wait_for(reader.read(65536), 5))
    return frames


async def test_plain_hello_while_restoring_resends_restore() -> None:
    ch, gr, gw = await pair(restoring=True)
    identity = Identity(hostname="c")
    await ch.restore(identity)
    (first,) = await read_frames(gr, 1)
    assert first.type is MsgType.RESTORE
    fields = decode_tlv(first.payload)
    assert fields.all(Tag.NONCE) == [identity.nonce]
    assert fields.text(Tag.HOSTNAME) == "c" and len(fields.all(Tag.ENTROPY)[0]) == 64
    assert abs(int.from_bytes(fields.all(Tag.REALTIME_NS)[0], "little") / 1e9 - time_now()) < 5
    gw.write(hello_frame())  # the agent greeted a reconnect: RESTORE goes out again
    (again,) = await read_frames(gr, 1)
    assert again.type is MsgType.RESTORE and decode_tlv(again.payload).all(Tag.NONCE) == [
        identity.nonce
    ]
    assert not ch.hello.done()
    gw.write(hello_frame(os.urandom(NONCE_LEN)))  # someone else's nonce: not ours, resend
    (third,) = await read_frames(gr, 1)
    assert third.type is MsgType.RESTORE
    gw.write(hello_frame(identity.nonce))
    hello = await asyncio.wait_for(ch.wait_hello(), 2)
    assert hello.nonce == identity.nonce
    gw.write(hello_frame(identity.nonce))  # the answer to the repeated RESTORE: ignored
    assert await asyncio.wait_for(ping_answered(ch, gr, gw), 2) >= 0
    gw.write(hello_frame())  # but a plain HELLO now is a violation
    await asyncio.wait_for(ch.closed_event.wait(), 2)
    assert isinstance(ch.close_reason, PortalError)
    await ch.close()


def time_now() -> float:
    import time

    return time.time()


async def ping_answered(
    ch: PortalChannel, gr: asyncio.StreamReader, gw: asyncio.StreamWriter
) -> float:
    task = asyncio.create_task(ch.ping(b"p"))
    (ping,) = await read_frames(gr, 1)
    gw.write(Frame(MsgType.PONG, 0, ping.payload).encode())
    return await task


async def test_restoring_channel_drops_stale_frames_before_its_hello() -> None:
    ch, gr, gw = await pair(restoring=True)
    identity = Identity(hostname="c")
    await ch.restore(identity)
    await read_frames(gr, 1)
    gw.write(Frame(MsgType.STDOUT, 3, b"old host's output").encode())  # held by the parent
    gw.write(hello_frame(identity.nonce))
    assert (await asyncio.wait_for(ch.wait_hello(), 2)).nonce == identity.nonce
    await ch.close()


async def test_bad_nonce_length_is_a_violation() -> None:
    ch, _, gw = await pair(restoring=True)
    gw.write(hello_frame(b"short"))
    with pytest.raises(PortalError, match="NONCE"):
        await asyncio.wait_for(ch.wait_hello(), 2)
    await ch.close()


async def test_freeze_times_out_and_thaws() -> None:
    ch, gr, gw = await pair()
    gw.write(hello_frame())
    await asyncio.wait_for(ch.wait_hello(), 2)
    with pytest.raises(TimeoutError):
        await ch.freeze(0.2)  # the guest never answers FROZEN
    frames = await read_frames(gr, 2)
    assert [f.type for f in frames] == [MsgType.FREEZE, MsgType.THAW]
    # not frozen any more: a spawn goes out at once
    await ch.spawn(SpawnRequest(["true"]))
    (spawn,) = await read_frames(gr, 1)
    assert spawn.type is MsgType.SPAWN
    await ch.close()


async def test_frames_sent_while_frozen_follow_thaw_in_order() -> None:
    ch, gr, gw = await pair()
    gw.write(hello_frame())
    await asyncio.wait_for(ch.wait_hello(), 2)
    freezing = asyncio.create_task(ch.freeze(2))
    (freeze,) = await read_frames(gr, 1)
    assert freeze.type is MsgType.FREEZE
    gw.write(Frame(MsgType.FROZEN, 0).encode())
    await freezing
    spawning = asyncio.create_task(ch.spawn(SpawnRequest(["true"])))
    await asyncio.sleep(0.05)
    assert not spawning.done()  # held
    ch.thaw(123)
    await spawning
    thaw, spawn = await read_frames(gr, 2)
    assert thaw.type is MsgType.THAW and decode_tlv(thaw.payload).u(Tag.REALTIME_NS) == 123
    assert spawn.type is MsgType.SPAWN
    await ch.close()


async def test_close_while_frozen_fails_held_writers() -> None:
    ch, gr, gw = await pair()
    gw.write(hello_frame())
    await asyncio.wait_for(ch.wait_hello(), 2)
    freezing = asyncio.create_task(ch.freeze(2))
    await read_frames(gr, 1)
    gw.write(Frame(MsgType.FROZEN, 0).encode())
    await freezing
    spawning = asyncio.create_task(ch.spawn(SpawnRequest(["true"])))
    await asyncio.sleep(0.05)
    gw.close()  # the guest goes away while we are frozen
    with pytest.raises(PortalError):
        await asyncio.wait_for(spawning, 2)
    await ch.close()


def test_identity_is_validated() -> None:
    with pytest.raises(BadRequestError):
        Identity(hostname="")
    with pytest.raises(BadRequestError):
        Identity(hostname="x" * 65)
    with pytest.raises(BadRequestError):
        Identity(hostname="a", entropy=b"")
    a, b = Identity(hostname="a"), Identity(hostname="a")
    assert a.nonce != b.nonce and a.entropy != b.entropy and len(a.nonce) == NONCE_LEN
