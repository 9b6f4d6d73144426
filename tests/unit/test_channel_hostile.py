"""The portal channel against a scripted (hostile) guest on a real socket pair.

These fake the guest on purpose — to send what a real agent never would — and check the host side
fails with PortalError, promptly, without hanging or buffering beyond the granted credit.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from hutch.errors import PortalError
from hutch.portal import PortalChannel, SpawnRequest
from hutch.portal.codec import (
    INITIAL_WINDOW,
    MAX_DATA,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    encode_tlv,
)

HOST_TYPES = frozenset(MsgType)


def hello(version: int = 1) -> bytes:
    return Frame(
        MsgType.HELLO, 0, encode_tlv([(Tag.VERSION, version), (Tag.AGENT, "fake")])
    ).encode()


async def pair() -> tuple[PortalChannel, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair()
    r, w = await asyncio.open_connection(sock=a)
    gr, gw = await asyncio.open_connection(sock=b)
    return PortalChannel(r, w), gr, gw


async def read_frames(reader: asyncio.StreamReader, n: int) -> list[Frame]:
    dec = FrameDecoder(HOST_TYPES)
    frames: list[Frame] = []
    while len(frames) < n:
        frames += dec.feed(await reader.read(65536))
    return frames


async def test_hello_then_exec_round_trip() -> None:
    ch, gr, gw = await pair()
    gw.write(hello())
    assert (await asyncio.wait_for(ch.wait_hello(), 2)).agent == "fake"
    stream = await ch.spawn(SpawnRequest(["echo", "hi"]))
    (spawn,) = await read_frames(gr, 1)
    assert spawn.type is MsgType.SPAWN and spawn.stream == stream.id
    gw.write(Frame(MsgType.STARTED, stream.id, encode_tlv([(Tag.PID, 42)])).encode())
    gw.write(Frame(MsgType.STDOUT, stream.id, b"hi\n").encode())
    gw.write(Frame(MsgType.EXIT, stream.id, encode_tlv([(Tag.EXIT_CODE, 0)])).encode())
    assert await asyncio.wait_for(stream.started, 2) == 42
    assert (await asyncio.wait_for(stream.exited, 2)).exit_code == 0
    assert await stream.queues[1].get() == b"hi\n"
    await ch.close()


async def test_wrong_version_is_refused() -> None:
    ch, _, gw = await pair()
    gw.write(hello(version=99))
    with pytest.raises(PortalError, match="hutch setup"):
        await asyncio.wait_for(ch.wait_hello(), 2)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        Frame(MsgType.PONG, 0).encode() + b"",  # anything before HELLO
        hello() + hello(),  # second hello
    ],
)
async def test_garbage_fails_pending_work(garbage: bytes) -> None:
    ch, _, gw = await pair()
    gw.write(garbage)
    await asyncio.wait_for(ch.closed_event.wait(), 2)
    assert isinstance(ch.close_reason, PortalError)


async def test_output_beyond_credit_is_a_violation_and_unblocks_waiters() -> None:
    ch, _gr, gw = await pair()
    gw.write(hello())
    await ch.wait_hello()
    stream = await ch.spawn(SpawnRequest(["cat"]))
    gw.write(Frame(MsgType.STARTED, stream.id, encode_tlv([(Tag.PID, 1)])).encode())
    chunk = b"z" * MAX_DATA
    for _ in range(INITIAL_WINDOW // MAX_DATA + 1):  # one frame more than the window
        gw.write(Frame(MsgType.STDOUT, stream.id, chunk).encode())
    await gw.drain()
    with pytest.raises(PortalError, match="credit"):
        await asyncio.wait_for(stream.exited, 2)
    # what was buffered on the host never exceeded the window
    assert stream.queues[1].qsize() <= INITIAL_WINDOW // MAX_DATA + 1


async def test_guest_disconnect_fails_execs() -> None:
    ch, _gr, gw = await pair()
    gw.write(hello())
    await ch.wait_hello()
    stream = await ch.spawn(SpawnRequest(["sleep", "9"]))
    gw.close()
    with pytest.raises(PortalError, match="closed"):
        await asyncio.wait_for(stream.started, 2)
    with pytest.raises(PortalError):
        await ch.spawn(SpawnRequest(["true"]))


async def test_exit_with_both_code_and_signal_is_rejected() -> None:
    ch, _gr, gw = await pair()
    gw.write(hello())
    await ch.wait_hello()
    stream = await ch.spawn(SpawnRequest(["x"]))
    gw.write(Frame(MsgType.STARTED, stream.id, encode_tlv([(Tag.PID, 1)])).encode())
    gw.write(
        Frame(MsgType.EXIT, stream.id, encode_tlv([(Tag.EXIT_CODE, 0), (Tag.SIGNAL, 9)])).encode()
    )
    with pytest.raises(PortalError, match="exactly one"):
        await asyncio.wait_for(stream.exited, 2)


async def test_oversized_requests_are_bad_requests_not_portal_errors() -> None:
    from hutch.errors import BadRequestError

    ch, _gr, gw = await pair()
    gw.write(hello())
    await ch.wait_hello()
    with pytest.raises(BadRequestError, match="limit"):
        await ch.spawn(SpawnRequest(["echo", "x" * (2 << 20)]))
    with pytest.raises(BadRequestError, match="4096"):
        await ch.spawn(SpawnRequest(["true"] * 5000))
    assert not ch.is_closed  # the channel is still usable
    await ch.close()
