"""The portal codec: round trips, and a hostile guest can only ever produce PortalError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hutch.errors import PortalError
from hutch.portal.codec import (
    HEADER,
    MAGIC,
    MAX_DATA,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    decode_tlv,
    encode_tlv,
)


def raw(
    mtype: int,
    stream: int,
    payload: bytes,
    *,
    magic: int = MAGIC,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    n = len(payload) if length is None else length
    return HEADER.pack(magic, mtype, flags, stream, n) + payload


def test_round_trip_split_at_every_byte() -> None:
    frames = [
        Frame(MsgType.HELLO, 0, encode_tlv([(Tag.VERSION, 1), (Tag.AGENT, "0.1")])),
        Frame(MsgType.STDOUT, 7, b"x" * 1000),
        Frame(MsgType.EXIT, 7, encode_tlv([(Tag.EXIT_CODE, 3), (Tag.DURATION_US, 12)])),
    ]
    wire = b"".join(f.encode() for f in frames)
    for cut in range(len(wire) + 1):
        dec = FrameDecoder()
        got = dec.feed(wire[:cut]) + dec.feed(wire[cut:])
        assert got == frames
        assert dec.buffered == 0


def test_tlv_round_trip_and_repeats() -> None:
    payload = encode_tlv(
        [(Tag.ARG, "sh"), (Tag.ARG, "-c"), (Tag.TIMEOUT_MS, 5), (Tag.DURATION_US, 2**40)]
    )
    f = decode_tlv(payload)
    assert f.all(Tag.ARG) == [b"sh", b"-c"]
    assert f.u(Tag.TIMEOUT_MS) == 5
    assert f.u(Tag.DURATION_US) == 2**40
    assert f.u(Tag.PID) is None and not f.has(Tag.PID)


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (raw(MsgType.HELLO, 0, b"", magic=0xDEAD), "bad magic"),
        (raw(MsgType.HELLO, 0, b"", flags=1), "flags"),
        (raw(0x7F, 0, b""), "unexpected message type"),
        (raw(MsgType.SPAWN, 1, b""), "unexpected message type"),  # host→guest type from the guest
        (raw(MsgType.STDOUT, 1, b"", length=MAX_DATA + 1), "exceeds"),
        (raw(MsgType.EXIT, 1, b"", length=MAX_PAYLOAD + 1), "exceeds"),
        (raw(MsgType.EXIT, 1, b"", length=0xFFFFFFFF), "exceeds"),
    ],
)
def test_bad_headers_raise_portal_error(wire: bytes, words: str) -> None:
    dec = FrameDecoder()
    with pytest.raises(PortalError, match=words):
        dec.feed(wire)
    # poisoned: keeps failing, never yields frames afterwards
    with pytest.raises(PortalError):
        dec.feed(Frame(MsgType.PONG, 0, b"").encode())


def test_huge_length_is_rejected_before_buffering() -> None:
    dec = FrameDecoder()
    with pytest.raises(PortalError):
        dec.feed(raw(MsgType.EXIT, 1, b"", length=2**31))
    assert dec.buffered == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01",  # truncated header
        struct.pack("<HI", 16, 10) + b"abc",  # claims more than present
        struct.pack("<HI", int(Tag.EXIT_CODE), 3) + b"abc",  # u32 of wrong size
        struct.pack("<HI", int(Tag.DURATION_US), 4) + b"abcd",  # u64 of wrong size
    ],
)
def test_malformed_tlv(payload: bytes) -> None:
    with pytest.raises(PortalError):
        decode_tlv(payload)


def test_unknown_tlv_tags_are_ignored() -> None:
    f = decode_tlv(struct.pack("<HI", 999, 2) + b"zz" + encode_tlv([(Tag.PID, 4)]))
    assert f.u(Tag.PID) == 4


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_fuzz_decoder_only_raises_portal_error(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    try:
        for c in chunks:
            for frame in dec.feed(c):
                assert len(frame.payload) <= MAX_PAYLOAD
                decode_tlv(frame.payload)
    except PortalError:
        pass
    assert dec.buffered <= MAX_PAYLOAD + HEADER.size


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(int(t) for t in MsgType)),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
    st.integers(0, 3),
)
def test_fuzz_structured_frames(mtype: int, stream: int, payload: bytes, junk: int) -> None:
    """Well-framed but arbitrary frames: decoding and TLV parsing raise only PortalError."""
    wire = raw(mtype, stream, payload) + bytes(junk)
    dec = FrameDecoder()
    try:
        for frame in dec.feed(wire):
            decode_tlv(frame.payload)
    except PortalError:
        pass
