"""Frame and TLV codec of the portal protocol (docs/PROTOCOL.md).

Hand-written on purpose: the format is a 12-byte header plus TLV lists, and the decoder has to be
strictly bounded against a hostile guest, which generic serialisation libraries don't promise.
Everything the guest sends passes through :class:`FrameDecoder` and :func:`decode_tlv`; both raise
:class:`~hutch.errors.PortalError` on any violation and never allocate more than ``MAX_PAYLOAD``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from hutch.errors import PortalError

PROTOCOL_VERSION = 1
#: Minor version (HELLO's ``MINOR``; absent = 0). 1 adds FREEZE/FROZEN/THAW/RESTORE (snapshots):
#: an agent that predates it cannot be snapshotted, everything else works as before. 2: the agent
#: mounts volumes and configures the NIC at boot, and HELLO carries ``SETUP_ERROR``s. 3: file
#: access (FILE_REQ/FILE_DATA/FILE_REPLY). 4: terminals (SPAWN's TTY/ROWS/COLS, RESIZE) and
#: RESTORE's MAC.
PROTOCOL_MINOR = 4
#: The minor version that serves FILE_REQ.
FILES_MINOR = 3
#: The minor version that runs processes on a terminal and sets a clone's MAC.
TTY_MINOR = 4
#: Length of RESTORE's nonce (echoed in the HELLO that answers it).
NONCE_LEN = 16
#: Most entropy bytes one RESTORE may carry (the agent's limit too).
MAX_ENTROPY = 512
MAGIC = 0x4854
HEADER = struct.Struct("<HBBII")
HEADER_SIZE = HEADER.size  # 12
MAX_PAYLOAD = 1 << 20
MAX_DATA = 64 << 10
INITIAL_WINDOW = 1 << 20
MAX_PING = 64
#: Most ARG (and, separately, ENV) entries one SPAWN may carry (the agent's limit too).
MAX_ARGS = 4096


class MsgType(IntEnum):
    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    SHUTDOWN = 0x04
    FREEZE = 0x05
    FROZEN = 0x06
    THAW = 0x07
    RESTORE = 0x08
    SPAWN = 0x20
    STDIN = 0x21
    SIGNAL = 0x22
    RESIZE = 0x23
    CREDIT = 0x30
    STARTED = 0x40
    STDOUT = 0x41
    STDERR = 0x42
    EXIT = 0x43
    SPAWN_FAILED = 0x44
    FILE_REQ = 0x50
    FILE_DATA = 0x51
    FILE_REPLY = 0x52


#: Message types the guest may send; anything else from the guest is a protocol violation.
GUEST_TYPES = frozenset(
    {
        MsgType.HELLO,
        MsgType.PONG,
        MsgType.FROZEN,
        MsgType.CREDIT,
        MsgType.STARTED,
        MsgType.STDOUT,
        MsgType.STDERR,
        MsgType.EXIT,
        MsgType.SPAWN_FAILED,
        MsgType.FILE_DATA,
        MsgType.FILE_REPLY,
    }
)
DATA_TYPES = frozenset({MsgType.STDOUT, MsgType.STDERR, MsgType.STDIN, MsgType.FILE_DATA})


class Tag(IntEnum):
    VERSION = 1
    AGENT = 2
    KERNEL = 3
    BOOT_START_US = 4
    BOOT_READY_US = 5
    MINOR = 6
    NONCE = 7
    SETUP_ERROR = 8
    ARG = 16
    ENV = 17
    CWD = 18
    USER = 19
    TIMEOUT_MS = 20
    STDIN = 21
    TTY = 22
    ROWS = 23
    COLS = 24
    SIGNAL = 32
    GROUP = 33
    FD = 34
    BYTES = 35
    PID = 48
    EXIT_CODE = 49
    TIMED_OUT = 50
    DURATION_US = 51
    ERRNO = 52
    KIND = 53
    MESSAGE = 54
    ENTROPY = 64
    REALTIME_NS = 65
    HOSTNAME = 66
    MAC = 67
    OP = 80
    PATH = 81
    MODE = 82
    FLAGS = 83
    FTYPE = 84
    SIZE = 85
    MTIME_NS = 86
    LINK_TARGET = 87
    ENTRY = 88
    NAME = 89
    TRUNCATED = 90
    CURSOR = 91


class FileOp(IntEnum):
    """``OP`` of a FILE_REQ (1.3)."""

    STAT = 1
    LIST = 2
    READ = 3
    WRITE = 4
    MKDIR = 5
    REMOVE = 6
    CHMOD = 7


U32_TAGS = frozenset(
    {
        Tag.VERSION,
        Tag.MINOR,
        Tag.TIMEOUT_MS,
        Tag.STDIN,
        Tag.TTY,
        Tag.ROWS,
        Tag.COLS,
        Tag.SIGNAL,
        Tag.GROUP,
        Tag.FD,
        Tag.BYTES,
        Tag.PID,
        Tag.EXIT_CODE,
        Tag.TIMED_OUT,
        Tag.ERRNO,
        Tag.OP,
        Tag.MODE,
        Tag.FLAGS,
        Tag.FTYPE,
        Tag.TRUNCATED,
    }
)
U64_TAGS = frozenset(
    {
        Tag.BOOT_START_US,
        Tag.BOOT_READY_US,
        Tag.DURATION_US,
        Tag.REALTIME_NS,
        Tag.SIZE,
        Tag.MTIME_NS,
        Tag.CURSOR,
    }
)
_TLV_HEAD = struct.Struct("<HI")


@dataclass(frozen=True)
class Frame:
    type: MsgType
    stream: int
    payload: bytes = b""

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise PortalError(f"frame payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        return HEADER.pack(MAGIC, int(self.type), 0, self.stream, len(self.payload)) + self.payload


class FrameDecoder:
    """Incremental decoder: feed bytes, take complete frames. Bounded by ``MAX_PAYLOAD``.

    Once it has raised, the decoder is poisoned and raises again on any further use.
    """

    def __init__(self, allowed: frozenset[MsgType] = GUEST_TYPES) -> None:
        self._buf = bytearray()
        self._allowed = allowed
        self._error: PortalError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        try:
            while len(self._buf) >= HEADER_SIZE:
                magic, mtype, flags, stream, length = HEADER.unpack_from(self._buf)
                self._check_header(magic, mtype, flags, length)
                end = HEADER_SIZE + length
                if len(self._buf) < end:
                    break
                payload = bytes(self._buf[HEADER_SIZE:end])
                del self._buf[:end]
                frames.append(Frame(MsgType(mtype), stream, payload))
        except PortalError as e:
            self._error = e
            self._buf.clear()
            raise
        return frames

    def _check_header(self, magic: int, mtype: int, flags: int, length: int) -> None:
        if magic != MAGIC:
            raise PortalError(f"malformed frame from guest: bad magic 0x{magic:04x}")
        if flags != 0:
            raise PortalError(f"malformed frame from guest: reserved flags 0x{flags:02x} set")
        if mtype not in self._allowed:
            raise PortalError(f"malformed frame from guest: unexpected message type 0x{mtype:02x}")
        limit = MAX_DATA if mtype in DATA_TYPES else MAX_PAYLOAD
        if length > limit:
            raise PortalError(
                f"malformed frame from guest: {MsgType(mtype).name} payload of {length} bytes "
                f"exceeds {limit}"
            )

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --- TLV -----------------------------------------------------------------------------------


@dataclass
class Fields:
    """A decoded TLV list: the last value of each tag, plus every value of repeatable ones."""

    values: dict[int, list[bytes]] = field(default_factory=dict)

    def all(self, tag: Tag) -> list[bytes]:
        return self.values.get(int(tag), [])

    def has(self, tag: Tag) -> bool:
        return int(tag) in self.values

    def u(self, tag: Tag, default: int | None = None) -> int | None:
        vals = self.values.get(int(tag))
        if not vals:
            return default
        return int.from_bytes(vals[-1], "little")

    def text(self, tag: Tag, default: str | None = None, limit: int = 4096) -> str | None:
        vals = self.values.get(int(tag))
        if not vals:
            return default
        return vals[-1][:limit].decode("utf-8", "replace")


def encode_tlv(entries: list[tuple[Tag, int | str | bytes]]) -> bytes:
    out = bytearray()
    for tag, value in entries:
        if isinstance(value, int):
            if tag in U64_TAGS:
                raw = value.to_bytes(8, "little")
            elif tag in U32_TAGS:
                raw = value.to_bytes(4, "little")
            else:
                raise ValueError(f"tag {tag.name} does not take an integer")
        elif isinstance(value, str):
            raw = value.encode()
        else:
            raw = value
        out += _TLV_HEAD.pack(int(tag), len(raw)) + raw
    return bytes(out)


def _iter_tlv(payload: bytes) -> Iterator[tuple[int, bytes]]:
    pos, n = 0, len(payload)
    while pos < n:
        if n - pos < _TLV_HEAD.size:
            raise PortalError("malformed TLV from guest: truncated entry header")
        tag, length = _TLV_HEAD.unpack_from(payload, pos)
        pos += _TLV_HEAD.size
        if length > n - pos:
            raise PortalError(f"malformed TLV from guest: entry {tag} claims {length} bytes")
        yield tag, payload[pos : pos + length]
        pos += length


def decode_tlv(payload: bytes) -> Fields:
    fields = Fields()
    for tag, value in _iter_tlv(payload):
        if tag in U32_TAGS and len(value) != 4:
            raise PortalError(f"malformed TLV from guest: tag {tag} must be 4 bytes")
        if tag in U64_TAGS and len(value) != 8:
            raise PortalError(f"malformed TLV from guest: tag {tag} must be 8 bytes")
        fields.values.setdefault(tag, []).append(value)
    return fields
