"""The file messages of portal 1.3 (codec) and guest-path / guest-name rules of hutch.files."""

from __future__ import annotations

import asyncio
import posixpath
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hutch.errors import BadRequestError, PortalError
from hutch.files import Files, _link_stays_inside, guest_path, valid_name
from hutch.portal.codec import (
    HEADER,
    INITIAL_WINDOW,
    MAGIC,
    MAX_DATA,
    Fields,
    FileOp,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    decode_tlv,
    encode_tlv,
)


def test_guest_path_normalisation() -> None:
    assert guest_path("/a/b/../c") == "/a/c"
    assert guest_path("/../../etc") == "/etc"
    assert guest_path("rel/x") == "/rel/x"
    assert guest_path("//a//b/./") == "/a/b"
    assert guest_path("/") == "/"
    for bad in ("", "/a\0b", "/" + "x" * 5000):
        with pytest.raises(BadRequestError):
            guest_path(bad)


@given(st.lists(st.sampled_from(["a", "b", "/", ".", ".."]), min_size=1, max_size=40))
def test_guest_path_properties(parts: list[str]) -> None:
    p = "".join(parts)
    n = guest_path(p)
    assert n.startswith("/") and not n.startswith("//")
    assert ".." not in n.split("/") and "." not in n.split("/")
    assert guest_path(n) == n
    assert n == "/" or not n.endswith("/")


def test_valid_name() -> None:
    for good in ("a", "...", "a.b", "x" * 255, "\udcff"):
        assert valid_name(good)
    for bad in ("", ".", "..", "a/b", "/", "a\0", "x" * 256):
        assert not valid_name(bad)


def test_link_targets() -> None:
    assert _link_stays_inside("d/inner") and _link_stays_inside("./x")
    for bad in ("/etc", "..", "../x", "a/../../x", "a/..", "", "a\0"):
        assert not _link_stays_inside(bad)


@given(
    op=st.sampled_from(list(FileOp)),
    path=st.binary(min_size=1, max_size=300),
    mode=st.integers(0, 0o7777),
    size=st.integers(0, 2**64 - 1),
)
def test_file_tlv_round_trip(op: FileOp, path: bytes, mode: int, size: int) -> None:
    payload = encode_tlv([(Tag.OP, int(op)), (Tag.PATH, path), (Tag.MODE, mode), (Tag.SIZE, size)])
    f = decode_tlv(payload)
    assert (f.u(Tag.OP), f.all(Tag.PATH), f.u(Tag.MODE), f.u(Tag.SIZE)) == (op, [path], mode, size)
    frame = Frame(MsgType.FILE_REPLY, 5, payload)
    (got,) = FrameDecoder().feed(frame.encode())
    assert got == frame


def test_file_frames_from_guest() -> None:
    d = FrameDecoder()
    assert d.feed(Frame(MsgType.FILE_DATA, 3, b"x" * (64 << 10)).encode())[0].stream == 3
    with pytest.raises(PortalError, match="exceeds"):
        FrameDecoder().feed(HEADER.pack(MAGIC, MsgType.FILE_DATA, 0, 3, (64 << 10) + 1))
    with pytest.raises(PortalError, match="unexpected message type"):
        FrameDecoder().feed(Frame(MsgType.FILE_REQ, 3, b"").encode())
    with pytest.raises(PortalError, match="must be 8 bytes"):
        decode_tlv(encode_tlv([(Tag.SIZE, b"\0" * 4)]))


@pytest.mark.parametrize("name", [b"..", b".", b"a/b", b"", b"x\0y", b"n" * 256])
async def test_hostile_listing_rejected(name: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = encode_tlv([(Tag.NAME, name), (Tag.FTYPE, 1), (Tag.SIZE, 1)])

    async def fake(self: Any, op: FileOp, path: str, **kw: Any) -> Fields:
        return decode_tlv(encode_tlv([(Tag.ENTRY, entry)]))

    monkeypatch.setattr(Files, "_simple", fake)
    with pytest.raises(PortalError, match="invalid name"):
        await Files(None).list("/x")  # type: ignore[arg-type]


async def test_truncated_listing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake(self: Any, op: FileOp, path: str, **kw: Any) -> Fields:
        return decode_tlv(encode_tlv([(Tag.TRUNCATED, 1)]))

    monkeypatch.setattr(Files, "_simple", fake)
    with pytest.raises(BadRequestError, match="more entries"):
        await Files(None).list("/x")  # type: ignore[arg-type]
    assert posixpath.join("/x", "y") == "/x/y"


def _entry(name: str) -> bytes:
    return encode_tlv([(Tag.NAME, name.encode()), (Tag.FTYPE, 1), (Tag.SIZE, 0)])


async def test_a_long_listing_is_read_page_by_page(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {
        None: [(Tag.ENTRY, _entry("b")), (Tag.TRUNCATED, 1), (Tag.CURSOR, 7)],
        7: [(Tag.ENTRY, _entry("c")), (Tag.TRUNCATED, 1), (Tag.CURSOR, 9)],
        9: [(Tag.ENTRY, _entry("a"))],
    }
    asked: list[int | None] = []

    async def fake(self: Any, op: FileOp, path: str, **kw: Any) -> Fields:
        asked.append(kw.get("cursor"))
        return decode_tlv(encode_tlv(pages[kw.get("cursor")]))  # type: ignore[arg-type]

    monkeypatch.setattr(Files, "_simple", fake)
    names = [i.name for i in await Files(None).list("/x")]  # type: ignore[arg-type]
    assert names == ["a", "b", "c"] and asked == [None, 7, 9]


async def test_a_hostile_listing_cannot_go_on_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    async def same_cursor(self: Any, op: FileOp, path: str, **kw: Any) -> Fields:
        return decode_tlv(
            encode_tlv([(Tag.ENTRY, _entry("a")), (Tag.TRUNCATED, 1), (Tag.CURSOR, 5)])
        )

    monkeypatch.setattr(Files, "_simple", same_cursor)
    with pytest.raises(PortalError, match="repeated a listing cursor"):
        await Files(None).list("/x")  # type: ignore[arg-type]

    async def endless(self: Any, op: FileOp, path: str, **kw: Any) -> Fields:
        nxt = (kw.get("cursor") or 0) + 1
        return decode_tlv(
            encode_tlv([(Tag.ENTRY, _entry("a")), (Tag.TRUNCATED, 1), (Tag.CURSOR, nxt)])
        )

    monkeypatch.setattr(Files, "_simple", endless)
    monkeypatch.setattr("hutch.files.MAX_LIST_ENTRIES", 50)
    with pytest.raises(BadRequestError, match="more than 50 entries"):
        await Files(None).list("/x")  # type: ignore[arg-type]


# --- a scripted hostile guest on a socket pair ----------------------------------------------


async def _pair() -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    from hutch.portal import PortalChannel

    a, b = socket.socketpair()
    r, w = await asyncio.open_connection(sock=a)
    gr, gw = await asyncio.open_connection(sock=b)
    ch = PortalChannel(r, w)
    hello = encode_tlv([(Tag.VERSION, 1), (Tag.MINOR, 3), (Tag.AGENT, "fake")])
    gw.write(Frame(MsgType.HELLO, 0, hello).encode())
    await asyncio.wait_for(ch.wait_hello(), 2)
    return ch, gr, gw


async def test_file_data_beyond_credit_is_a_violation() -> None:
    ch, gr, gw = await _pair()
    stream = await ch.file_request(FileOp.READ, "/big")
    chunk = Frame(MsgType.FILE_DATA, stream.id, b"x" * MAX_DATA).encode()
    for _ in range(INITIAL_WINDOW // MAX_DATA + 1):
        gw.write(chunk)
    with pytest.raises(PortalError, match="credit"):
        await asyncio.wait_for(stream.reply, 2)
    assert stream.queue.qsize() <= INITIAL_WINDOW // MAX_DATA + 1
    await ch.close()


async def test_file_data_on_a_write_or_empty_is_a_violation() -> None:
    ch, gr, gw = await _pair()
    stream = await ch.file_request(FileOp.WRITE, "/w", mode=0o600)
    gw.write(Frame(MsgType.FILE_DATA, stream.id, b"x").encode())
    with pytest.raises(PortalError, match="unexpected FILE_DATA"):
        await asyncio.wait_for(stream.reply, 2)
    await ch.close()


async def test_write_waits_for_guest_credit() -> None:
    ch, gr, gw = await _pair()
    stream = await ch.file_request(FileOp.WRITE, "/w")

    async def drain() -> None:
        while await gr.read(1 << 16):
            pass

    sink = asyncio.ensure_future(drain())
    writer = asyncio.ensure_future(stream.write(b"y" * (INITIAL_WINDOW + 10)))
    await asyncio.sleep(0.2)
    assert not writer.done()  # one window sent, waiting for CREDIT fd 0
    gw.write(Frame(MsgType.CREDIT, stream.id, encode_tlv([(Tag.FD, 0), (Tag.BYTES, 10)])).encode())
    await asyncio.wait_for(writer, 2)
    gw.write(Frame(MsgType.FILE_REPLY, stream.id, encode_tlv([(Tag.ERRNO, 2)])).encode())
    from hutch.errors import NotFoundError

    with pytest.raises(NotFoundError, match="/w"):
        await asyncio.wait_for(stream.reply, 2)
    assert not ch.is_closed
    await ch.close()
    sink.cancel()
