"""The multiplexed host side of the portal: one reader task, many process streams.

A :class:`PortalChannel` owns the connection to the guest agent (QEMU's Unix socket for the
``hutch.portal`` virtio-serial port, or the agent's test socket). It decodes frames with the bounded
:class:`~hutch.portal.codec.FrameDecoder`, routes them to :class:`ProcessStream` objects by stream id
and enforces the flow-control windows of docs/PROTOCOL.md §5, so the host never holds more than one
window of unread output per fd.

Any protocol violation closes the channel: every waiting caller gets the :class:`PortalError`.

Snapshots (PROTOCOL.md §3, ``FREEZE``): :meth:`PortalChannel.freeze` holds every frame the host
would send until :meth:`PortalChannel.thaw`, so the host→guest byte stream ends on a frame
boundary while the VM is paused. A channel to a clone is opened with ``restoring=True``: its
handshake is :meth:`PortalChannel.restore` (``RESTORE``) answered by a ``HELLO`` carrying the same
nonce; a plain ``HELLO`` before that (the agent greeting a reconnect) makes it send ``RESTORE``
again instead of completing the handshake. A running box can take a new identity again later
(:meth:`PortalChannel.reidentify`: a warm-pool box handed out): another ``RESTORE`` with a new
nonce, answered by a ``HELLO`` with that nonce.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hutch.errors import (
    BadRequestError,
    ConflictError,
    GuestPermissionError,
    HutchError,
    InvalidStateError,
    NotFoundError,
    PortalError,
)
from hutch.portal.codec import (
    INITIAL_WINDOW,
    MAX_ARGS,
    MAX_DATA,
    MAX_ENTROPY,
    MAX_PAYLOAD,
    MAX_PING,
    NONCE_LEN,
    PROTOCOL_VERSION,
    Fields,
    FileOp,
    Frame,
    FrameDecoder,
    MsgType,
    Tag,
    decode_tlv,
    encode_tlv,
)

log = logging.getLogger("hutch.portal")

READ_CHUNK = 256 << 10
#: Output credit is returned to the guest in batches of this many bytes (see ProcessStream.consumed).
CREDIT_BATCH = INITIAL_WINDOW // 4
EOF = None
#: Bytes of host entropy a clone gets in RESTORE.
RESTORE_ENTROPY = 64
#: Frames a restoring channel drops before its handshake (output a clone held for its parent's
#: host); more is a protocol violation.
MAX_STALE_BYTES = 16 << 20


@dataclass(frozen=True)
class Hello:
    version: int
    agent: str
    kernel: str
    boot_start_us: int
    boot_ready_us: int
    #: Protocol minor version (0 for agents that predate it); snapshots need 1.
    minor: int = 0
    #: The nonce of the RESTORE this HELLO answers (a clone's handshake), else None.
    nonce: bytes | None = None
    #: What the agent could not set up at boot (1.2: a volume it could not mount, a NIC it
    #: could not configure), each a guest-written message (at most 8, 256 bytes each).
    setup_errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Identity:
    """What a clone takes on when it resumes (``RESTORE``): a fresh RNG seed, the host's clock
    (read when the frame is sent), its hostname and (1.4, boxes with a NIC) its MAC."""

    hostname: str
    #: The NIC's new MAC (6 bytes), or None to keep it (no NIC, or an agent older than 1.4).
    mac: bytes | None = None
    entropy: bytes = field(default_factory=lambda: os.urandom(RESTORE_ENTROPY), repr=False)
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(NONCE_LEN))

    def __post_init__(self) -> None:
        raw = self.hostname.encode()
        if not 1 <= len(raw) <= 64 or b"\0" in raw:
            raise BadRequestError(f"invalid guest hostname {self.hostname!r} (1 to 64 bytes)")
        if not 1 <= len(self.entropy) <= MAX_ENTROPY:
            raise BadRequestError(f"RESTORE carries 1 to {MAX_ENTROPY} bytes of entropy")
        if len(self.nonce) != NONCE_LEN:
            raise BadRequestError(f"a RESTORE nonce is {NONCE_LEN} bytes")
        if self.mac is not None and len(self.mac) != 6:
            raise BadRequestError("a MAC is 6 bytes")

    def encode(self, realtime_ns: int | None = None) -> bytes:
        entries: list[tuple[Tag, int | str | bytes]] = [
            (Tag.NONCE, self.nonce),
            (Tag.ENTROPY, self.entropy),
            (Tag.REALTIME_NS, time.time_ns() if realtime_ns is None else realtime_ns),
            (Tag.HOSTNAME, self.hostname),
        ]
        if self.mac is not None:
            entries.append((Tag.MAC, self.mac))
        return encode_tlv(entries)


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_us: int


@dataclass(frozen=True)
class SpawnRequest:
    argv: Sequence[str]
    env: Sequence[tuple[str, str]] = ()
    cwd: str | None = None
    user: str | None = None
    timeout_ms: int = 0
    stdin: bool = False
    #: Run on a terminal (1.4) of this many (rows, columns); None = pipes.
    tty: tuple[int, int] | None = None

    def encode(self) -> bytes:
        entries: list[tuple[Tag, int | str | bytes]] = [(Tag.ARG, a) for a in self.argv]
        entries += [(Tag.ENV, f"{k}={v}") for k, v in self.env]
        if self.cwd is not None:
            entries.append((Tag.CWD, self.cwd))
        if self.user is not None:
            entries.append((Tag.USER, self.user))
        if self.timeout_ms:
            entries.append((Tag.TIMEOUT_MS, self.timeout_ms))
        entries.append((Tag.STDIN, 1 if self.stdin else 0))
        if self.tty is not None:
            entries += [(Tag.TTY, 1), (Tag.ROWS, self.tty[0]), (Tag.COLS, self.tty[1])]
        return encode_tlv(entries)


class ProcessStream:
    """One guest process as the portal sees it: start, output queues, stdin credit, exit."""

    def __init__(self, channel: PortalChannel, stream_id: int, argv: Sequence[str]) -> None:
        self.channel = channel
        self.id = stream_id
        self.argv = list(argv)
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[int] = loop.create_future()
        self.exited: asyncio.Future[ExitInfo] = loop.create_future()
        # One queue per output fd; holds at most INITIAL_WINDOW bytes because of credit.
        self.queues: dict[int, asyncio.Queue[bytes | None]] = {
            1: asyncio.Queue(),
            2: asyncio.Queue(),
        }
        self._out_credit = {1: INITIAL_WINDOW, 2: INITIAL_WINDOW}
        self._credit_pending = {1: 0, 2: 0}
        self._stdin_credit = INITIAL_WINDOW
        self._stdin_wakeup = asyncio.Event()
        self._stdin_closed = False
        self.closed = False

    # --- guest → host ---------------------------------------------------------------------
    def _on_output(self, fd: int, data: bytes) -> None:
        if self.closed:
            return
        if not data:
            raise PortalError(f"guest sent an empty output frame on stream {self.id}")
        if len(data) > self._out_credit[fd]:
            raise PortalError(
                f"guest sent {len(data)} bytes on fd {fd} of stream {self.id} with only "
                f"{self._out_credit[fd]} bytes of credit (flow-control violation)"
            )
        self._out_credit[fd] -= len(data)
        self.queues[fd].put_nowait(data)

    def _on_credit(self, fields: Fields) -> None:
        fd, n = fields.u(Tag.FD), fields.u(Tag.BYTES)
        if fd != 0 or n is None:
            raise PortalError(f"guest sent a CREDIT for fd {fd} (only stdin credit comes back)")
        self._stdin_credit = min(self._stdin_credit + n, INITIAL_WINDOW)
        self._stdin_wakeup.set()

    def _on_exit(self, fields: Fields) -> None:
        code, sig = fields.u(Tag.EXIT_CODE), fields.u(Tag.SIGNAL)
        if (code is None) == (sig is None):
            raise PortalError(f"guest EXIT on stream {self.id} needs exactly one of code/signal")
        if code is not None and code > 255:
            raise PortalError(f"guest EXIT on stream {self.id} has exit code {code} > 255")
        info = ExitInfo(
            exit_code=code,
            signal=sig,
            timed_out=bool(fields.u(Tag.TIMED_OUT, 0)),
            duration_us=fields.u(Tag.DURATION_US, 0) or 0,
        )
        if not self.started.done():
            raise PortalError(f"guest sent EXIT before STARTED on stream {self.id}")
        self._finish(info=info)

    def _on_spawn_failed(self, fields: Fields) -> None:
        err = fields.u(Tag.ERRNO, 0) or 0
        kind = fields.text(Tag.KIND, "request", limit=32) or "request"
        message = fields.text(Tag.MESSAGE, "", limit=1024) or ""
        detail = message or f"{kind} failed: {errno_mod.errorcode.get(err, err)}"
        exc: HutchError
        if kind == "command" and err == errno_mod.ENOENT:
            exc = NotFoundError(
                f"cannot run {self.argv[0]!r} in the guest: {detail}",
                hint="Check the command name and the image's PATH (e.g. `ls /bin /usr/bin`).",
            )
        elif kind == "user":
            exc = BadRequestError(
                f"unknown user for {self.argv[0]!r}: {detail}",
                hint="Use a name from the image's /etc/passwd, a uid, or uid:gid.",
            )
        elif kind == "cwd":
            exc = BadRequestError(
                f"cannot use working directory: {detail}",
                hint="Pass an existing directory of the guest as cwd.",
            )
        else:
            exc = BadRequestError(f"cannot start {self.argv[0]!r} in the guest: {detail}")
        self._finish(error=exc)

    def _finish(self, *, info: ExitInfo | None = None, error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.channel._streams.pop(self.id, None)
        if error is not None:
            for fut in (self.started, self.exited):
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()  # mark retrieved; callers re-raise through their own awaits
        elif info is not None and not self.exited.done():
            self.exited.set_result(info)
        for q in self.queues.values():
            q.put_nowait(EOF)
        self._stdin_wakeup.set()

    # --- host → guest ---------------------------------------------------------------------
    def consumed(self, fd: int, n: int) -> None:
        """The consumer took ``n`` bytes of fd 1/2: give the guest that much credit back.

        Credit is batched (every ``CREDIT_BATCH`` bytes, or at once when the consumer has caught
        up and the guest may be waiting), so bulk output costs the guest few extra reads.
        """
        if self.closed or n <= 0:
            return
        pending = self._credit_pending[fd] + n
        if pending < CREDIT_BATCH and not self.queues[fd].empty():
            self._credit_pending[fd] = pending
            return
        self._credit_pending[fd] = 0
        self._out_credit[fd] += pending
        self.channel._send_nowait(
            Frame(MsgType.CREDIT, self.id, encode_tlv([(Tag.FD, fd), (Tag.BYTES, pending)]))
        )

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._stdin_closed:
                raise BadRequestError("stdin of this process is already closed")
            while self._stdin_credit == 0 and not self.closed:
                self._stdin_wakeup.clear()
                await self._stdin_wakeup.wait()
            if self.closed:
                return  # the process is gone; like writing to a closed pipe, the data is dropped
            n = min(len(view), self._stdin_credit, MAX_DATA)
            self._stdin_credit -= n
            await self.channel._send(Frame(MsgType.STDIN, self.id, bytes(view[:n])))
            view = view[n:]

    async def close_stdin(self) -> None:
        if self._stdin_closed or self.closed:
            self._stdin_closed = True
            return
        self._stdin_closed = True
        await self.channel._send(Frame(MsgType.STDIN, self.id, b""))

    async def signal(self, signo: int, group: bool = False) -> None:
        if not 1 <= signo <= 64:
            raise BadRequestError(f"signal number {signo} is out of range 1..64")
        if self.closed:
            return
        payload = encode_tlv([(Tag.SIGNAL, signo), (Tag.GROUP, 1 if group else 0)])
        await self.channel._send(Frame(MsgType.SIGNAL, self.id, payload))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size (1.4; the guest's foreground process gets ``SIGWINCH``)."""
        if self.closed:
            return
        payload = encode_tlv([(Tag.ROWS, rows), (Tag.COLS, cols)])
        await self.channel._send(Frame(MsgType.RESIZE, self.id, payload))


class FileStream:
    """One file operation (1.3): ``FILE_REQ``, then ``FILE_DATA`` in one direction, then the
    guest's ``FILE_REPLY``, which ends the stream.

    Reads: the guest sends at most the credit the host granted (``CREDIT`` fd 1, returned as the
    consumer takes data), so :attr:`queue` holds at most ``INITIAL_WINDOW`` bytes. Writes: the
    host sends at most the credit the guest granted (``CREDIT`` fd 0, returned once written).
    """

    def __init__(self, channel: PortalChannel, stream_id: int, op: FileOp, path: str) -> None:
        self.channel = channel
        self.id = stream_id
        self.op = op
        self.path = path
        loop = asyncio.get_running_loop()
        #: The FILE_REPLY's fields; raises the mapped error (ERRNO) or the channel's failure.
        self.reply: asyncio.Future[Fields] = loop.create_future()
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._in_credit = INITIAL_WINDOW  # FILE_DATA the guest may still send
        self._credit_pending = 0
        self._out_credit = INITIAL_WINDOW  # FILE_DATA the host may still send
        self._wakeup = asyncio.Event()
        self.closed = False

    def _on_data(self, data: bytes) -> None:
        if self.closed:
            return
        if self.op is not FileOp.READ or not data:
            raise PortalError(f"guest sent unexpected FILE_DATA on stream {self.id}")
        if len(data) > self._in_credit:
            raise PortalError(
                f"guest sent {len(data)} file bytes on stream {self.id} with only "
                f"{self._in_credit} bytes of credit (flow-control violation)"
            )
        self._in_credit -= len(data)
        self.queue.put_nowait(data)

    def _on_credit(self, fields: Fields) -> None:
        fd, n = fields.u(Tag.FD), fields.u(Tag.BYTES)
        if fd != 0 or n is None:
            raise PortalError(f"guest sent a CREDIT for fd {fd} on file stream {self.id}")
        self._out_credit = min(self._out_credit + n, INITIAL_WINDOW)
        self._wakeup.set()

    def _on_reply(self, fields: Fields) -> None:
        err = fields.u(Tag.ERRNO)
        if err is not None:
            message = fields.text(Tag.MESSAGE, "", limit=512) or ""
            self._finish(error=file_error(err, self.path, message))
        else:
            self._finish(fields=fields)

    def _finish(self, *, fields: Fields | None = None, error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.channel._files.pop(self.id, None)
        if not self.reply.done():
            if error is not None:
                self.reply.set_exception(error)
                self.reply.exception()
            else:
                self.reply.set_result(fields if fields is not None else Fields())
        self.queue.put_nowait(EOF)
        self._wakeup.set()

    def consumed(self, n: int) -> None:
        """The consumer took ``n`` bytes of a read: give the guest that much credit back."""
        if self.closed or n <= 0:
            return
        pending = self._credit_pending + n
        if pending < CREDIT_BATCH and not self.queue.empty():
            self._credit_pending = pending
            return
        self._credit_pending = 0
        self._in_credit += pending
        self.channel._send_nowait(
            Frame(MsgType.CREDIT, self.id, encode_tlv([(Tag.FD, 1), (Tag.BYTES, pending)]))
        )

    async def write(self, data: bytes) -> None:
        """Send file data within the guest's credit (waits for credit). Returns early, dropping
        the data, when the guest has already replied (an error: see :attr:`reply`)."""
        view = memoryview(data)
        while view:
            while self._out_credit == 0 and not self.closed:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.closed:
                return
            n = min(len(view), self._out_credit, MAX_DATA)
            self._out_credit -= n
            await self.channel._send(Frame(MsgType.FILE_DATA, self.id, bytes(view[:n])))
            view = view[n:]

    def cancel_nowait(self) -> None:
        """Abandon the operation: the guest closes the file (a write keeps what it got) and
        answers ECANCELED; this side ignores whatever else arrives for the stream."""
        if self.closed:
            return
        self.channel._send_nowait(
            Frame(MsgType.SIGNAL, self.id, encode_tlv([(Tag.SIGNAL, 9), (Tag.GROUP, 0)]))
        )
        self._finish(error=BadRequestError(f"file operation on {self.path!r} was cancelled"))

    async def cancel(self) -> None:
        self.cancel_nowait()
        with contextlib.suppress(OSError, RuntimeError):
            await self.channel._writer.drain()

    async def end(self) -> None:
        """End of the written data (an empty FILE_DATA)."""
        if not self.closed:
            await self.channel._send(Frame(MsgType.FILE_DATA, self.id, b""))


def file_error(err: int, path: str, message: str = "") -> HutchError:
    """The typed hutch error for a guest ``errno`` on ``path``."""
    name = errno_mod.errorcode.get(err, str(err))
    reason = os.strerror(err) if err in errno_mod.errorcode else f"error {err}"
    text = f"guest path {path!r}: {reason} ({name})"
    if err == errno_mod.ENOENT:
        return NotFoundError(text, hint="Check the path (e.g. `box.files.list(parent)`).")
    if err in (errno_mod.EEXIST, errno_mod.ENOTEMPTY):
        return ConflictError(
            text, hint="Remove it first (`recursive=True` for a directory), or pick another path."
        )
    if err in (errno_mod.EACCES, errno_mod.EPERM, errno_mod.EROFS):
        return GuestPermissionError(text)
    if err in (
        errno_mod.EISDIR,
        errno_mod.ENOTDIR,
        errno_mod.EINVAL,
        errno_mod.ENAMETOOLONG,
        errno_mod.ELOOP,
    ):
        return BadRequestError(text)
    return BadRequestError(text, hint=message[:200] or "")


class PortalChannel:
    """The host end of one guest's portal connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, restoring: bool = False
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder()
        self._streams: dict[int, ProcessStream] = {}
        self._files: dict[int, FileStream] = {}
        self._next_id = 1
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = loop.create_future()
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._closed: BaseException | None = None
        self.closed_event = asyncio.Event()
        # Snapshots: frames held while frozen, and the FROZEN being waited for.
        self._paused = False
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._held: list[bytes] = []
        self._frozen: asyncio.Future[None] | None = None
        # Clones: the handshake is RESTORE → HELLO with its nonce.
        self._restoring = restoring
        self._identity: Identity | None = None
        #: Nonces of every RESTORE sent: HELLOs answering them after the handshake are expected.
        self._nonces: set[bytes] = set()
        self._reidentified: asyncio.Future[Hello] | None = None
        self._stale_bytes = 0
        self._task = loop.create_task(self._read_loop(), name="hutch-portal-reader")

    # --- lifecycle ------------------------------------------------------------------------
    @classmethod
    async def connect_unix(cls, path: str, *, restoring: bool = False) -> PortalChannel:
        """Connect to a guest's portal socket; ``restoring`` for a clone (see :meth:`restore`)."""
        reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK)
        return cls(reader, writer, restoring=restoring)

    async def wait_hello(self) -> Hello:
        return await asyncio.shield(self.hello)

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> BaseException | None:
        return self._closed

    def _fail(self, exc: BaseException) -> None:
        if self._closed is not None:
            return
        self._closed = exc
        if not self.hello.done():
            self.hello.set_exception(exc)
            self.hello.exception()
        for stream in list(self._streams.values()):
            stream._finish(error=exc)
        for fstream in list(self._files.values()):
            fstream._finish(error=exc)
        for fut in [*self._pongs.values(), self._frozen, self._reidentified]:
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._pongs.clear()
        self._unpaused.set()  # writers waiting for a thaw fail in _check_open
        with contextlib.suppress(Exception):
            self._writer.close()
        self.closed_event.set()

    async def close(self, reason: str = "portal closed by the host") -> None:
        self._fail(PortalError(reason, hint=""))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # --- reading --------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    self._fail(
                        PortalError("the guest closed the portal (agent exited or VM stopped)")
                    )
                    return
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except PortalError as e:
            log.warning("portal violation: %s", e.message)
            self._fail(e)
        except ConnectionResetError:
            self._fail(PortalError("the guest closed the portal (connection reset)"))
        except (OSError, asyncio.IncompleteReadError) as e:
            self._fail(PortalError(f"portal connection failed: {e}"))
        except asyncio.CancelledError:
            self._fail(PortalError("portal reader cancelled"))
            raise

    def _dispatch(self, frame: Frame) -> None:
        t = frame.type
        if t is MsgType.HELLO:
            self._on_hello(frame)
            return
        if not self.hello.done():
            if self._restoring:
                # A clone may still flush output its parent's host was owed: drop it.
                self._stale_bytes += len(frame.payload) + 12
                if self._stale_bytes > MAX_STALE_BYTES:
                    raise PortalError(
                        f"guest sent {self._stale_bytes} bytes before answering RESTORE"
                    )
                return
            raise PortalError(f"guest sent {t.name} before HELLO")
        if t is MsgType.FROZEN:
            if self._frozen is not None and not self._frozen.done():
                self._frozen.set_result(None)
            return
        if t is MsgType.PONG:
            fut = self._pongs.pop(frame.payload, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        fstream = self._files.get(frame.stream)
        if fstream is not None:
            if t is MsgType.FILE_DATA:
                fstream._on_data(frame.payload)
            elif t is MsgType.FILE_REPLY:
                fstream._on_reply(decode_tlv(frame.payload))
            elif t is MsgType.CREDIT:
                fstream._on_credit(decode_tlv(frame.payload))
            return
        if t is MsgType.FILE_DATA:
            return  # late data of a file stream that ended
        stream = self._streams.get(frame.stream)
        if t is MsgType.STDOUT or t is MsgType.STDERR:
            if stream is not None:
                stream._on_output(1 if t is MsgType.STDOUT else 2, frame.payload)
            return
        fields = decode_tlv(frame.payload)
        if stream is None:
            return  # late frame for a stream we no longer track
        if t is MsgType.STARTED:
            pid = fields.u(Tag.PID)
            if pid is None:
                raise PortalError(f"guest STARTED on stream {frame.stream} without a pid")
            if not stream.started.done():
                stream.started.set_result(pid)
        elif t is MsgType.EXIT:
            stream._on_exit(fields)
        elif t is MsgType.SPAWN_FAILED:
            stream._on_spawn_failed(fields)
        elif t is MsgType.CREDIT:
            stream._on_credit(fields)

    def _on_hello(self, frame: Frame) -> None:
        f = decode_tlv(frame.payload)
        nonces = f.all(Tag.NONCE)
        if any(len(n) != NONCE_LEN for n in nonces):
            raise PortalError(f"malformed HELLO from guest: NONCE must be {NONCE_LEN} bytes")
        nonce = nonces[-1] if nonces else None
        ours = self._identity.nonce if self._identity is not None else None
        if self.hello.done():
            if nonce is not None and nonce in self._nonces:
                fut = self._reidentified
                if nonce == ours and fut is not None and not fut.done():
                    fut.set_result(self._hello(f, nonce))
                return  # the answer to a repeated (or a later) RESTORE
            raise PortalError("guest sent a second HELLO")
        version = f.u(Tag.VERSION)
        if version != PROTOCOL_VERSION:
            raise PortalError(
                f"guest agent speaks portal protocol {version}, this host speaks "
                f"{PROTOCOL_VERSION}",
                hint="Run `hutch setup` to rebuild the guest agent and initramfs.",
            )
        if self._restoring and (nonce is None or nonce != ours):
            # The agent greeted a (re)connection, not our RESTORE: it may have dropped the
            # RESTORE with the old connection's input, so send it again.
            if self._identity is not None:
                self._send_raw(Frame(MsgType.RESTORE, 0, self._identity.encode()))
            return
        self.hello.set_result(self._hello(f, nonce))

    @staticmethod
    def _hello(f: Fields, nonce: bytes | None) -> Hello:
        return Hello(
            version=f.u(Tag.VERSION) or 0,
            agent=f.text(Tag.AGENT, "", limit=64) or "",
            kernel=f.text(Tag.KERNEL, "", limit=256) or "",
            boot_start_us=f.u(Tag.BOOT_START_US, 0) or 0,
            boot_ready_us=f.u(Tag.BOOT_READY_US, 0) or 0,
            minor=f.u(Tag.MINOR, 0) or 0,
            nonce=nonce,
            setup_errors=tuple(
                v[:256].decode("utf-8", "replace") for v in f.all(Tag.SETUP_ERROR)[:8]
            ),
        )

    # --- writing --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed is not None:
            if isinstance(self._closed, HutchError):
                raise PortalError(f"portal is closed: {self._closed.message}")
            raise PortalError(f"portal is closed: {self._closed}")

    def _send_raw(self, frame: Frame) -> None:
        """Write now, even while frozen (FREEZE/THAW/RESTORE themselves)."""
        if self._closed is not None:
            return
        try:
            self._writer.write(frame.encode())
        except (OSError, RuntimeError) as e:
            self._fail(PortalError(f"portal write failed: {e}"))

    def _send_nowait(self, frame: Frame) -> None:
        if self._closed is not None:
            return
        if self._paused:
            self._held.append(frame.encode())
            return
        self._send_raw(frame)

    async def _send(self, frame: Frame) -> None:
        while self._paused:
            self._check_open()
            await self._unpaused.wait()
        self._check_open()
        try:
            self._writer.write(frame.encode())
            await self._writer.drain()
        except (OSError, RuntimeError) as e:
            self._fail(PortalError(f"portal write failed: {e}"))
            self._check_open()

    # --- snapshots ------------------------------------------------------------------------
    async def freeze(self, timeout: float) -> None:
        """Send FREEZE and wait (up to ``timeout`` s) for FROZEN. From the call on, frames the
        host sends are held until :meth:`thaw` — which the caller must call, also on error
        (a failed freeze thaws by itself)."""
        self._check_open()
        if self._paused:
            raise PortalError("the portal is already frozen")
        self._paused = True
        self._unpaused.clear()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._frozen = fut
        try:
            self._send_raw(Frame(MsgType.FREEZE, 0))
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException:
            self.thaw()
            raise
        finally:
            self._frozen = None

    def thaw(self, realtime_ns: int | None = None) -> None:
        """Send THAW (with the host's clock, if given), then every frame held since
        :meth:`freeze`, and let writers go on."""
        if not self._paused:
            return
        payload = encode_tlv([(Tag.REALTIME_NS, realtime_ns)]) if realtime_ns is not None else b""
        self._send_raw(Frame(MsgType.THAW, 0, payload))
        held, self._held = self._held, []
        if self._closed is None:
            for data in held:
                try:
                    self._writer.write(data)
                except (OSError, RuntimeError) as e:
                    self._fail(PortalError(f"portal write failed: {e}"))
                    break
        self._paused = False
        self._unpaused.set()

    async def restore(self, identity: Identity) -> None:
        """A clone's handshake: send RESTORE; :attr:`hello` resolves with the HELLO that carries
        its nonce (the caller bounds the wait). Only for channels opened with ``restoring``."""
        self._check_open()
        if not self._restoring or self._identity is not None:
            raise PortalError("restore() is the handshake of a restoring channel, once")
        self._identity = identity
        self._nonces.add(identity.nonce)
        self._send_raw(Frame(MsgType.RESTORE, 0, identity.encode()))
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.drain()

    async def reidentify(self, identity: Identity) -> Hello:
        """Give a running guest a new identity: ``RESTORE`` again (fresh entropy, the host's clock
        now, the hostname) on this connection; returns the ``HELLO`` that answers it (the caller
        bounds the wait). The agent detaches the processes it runs for this host, so call it
        while none run — a warm-pool box being handed out. Needs a completed handshake (any
        channel, restored or booted) and a 1.1 agent."""
        self._check_open()
        if not self.hello.done() or self._paused:
            raise PortalError("reidentify() needs a guest that said HELLO and is not frozen")
        if self._reidentified is not None and not self._reidentified.done():
            raise PortalError("a reidentify() is already waiting for its HELLO")
        for fstream in list(self._files.values()):  # the agent drops them with the identity
            fstream._finish(
                error=InvalidStateError("file operation interrupted: box re-identified")
            )
        fut: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self._reidentified = fut
        self._identity = identity
        self._nonces.add(identity.nonce)
        self._send_raw(Frame(MsgType.RESTORE, 0, identity.encode()))
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.drain()
        try:
            return await asyncio.shield(fut)
        finally:
            if self._reidentified is fut:
                self._reidentified = None

    async def spawn(self, request: SpawnRequest) -> ProcessStream:
        """Send SPAWN; the returned stream's ``started`` resolves to the pid or raises."""
        self._check_open()
        if not request.argv:
            raise BadRequestError("a command needs at least one argument (the program)")
        if len(request.argv) > MAX_ARGS or len(request.env) > MAX_ARGS:
            raise BadRequestError(
                f"at most {MAX_ARGS} arguments and {MAX_ARGS} environment variables per command"
            )
        payload = request.encode()
        if len(payload) > MAX_PAYLOAD:
            raise BadRequestError(
                f"command line and environment take {len(payload)} bytes; the limit is "
                f"{MAX_PAYLOAD}",
                hint="Pass large data through stdin or a file instead of arguments.",
            )
        stream_id = self._next_id
        self._next_id += 1
        stream = ProcessStream(self, stream_id, request.argv)
        self._streams[stream_id] = stream
        await self._send(Frame(MsgType.SPAWN, stream_id, payload))
        return stream

    async def file_request(
        self,
        op: FileOp,
        path: str,
        *,
        mode: int | None = None,
        flags: int = 0,
        cursor: int | None = None,
    ) -> FileStream:
        """Send a FILE_REQ (1.3) for the normalised absolute guest ``path``; the stream's
        ``reply`` resolves when the guest answers (reads: after the data)."""
        self._check_open()
        entries: list[tuple[Tag, int | str | bytes]] = [
            (Tag.OP, int(op)),
            (Tag.PATH, path.encode("utf-8", "surrogateescape")),
        ]
        if mode is not None:
            entries.append((Tag.MODE, mode))
        if flags:
            entries.append((Tag.FLAGS, flags))
        if cursor is not None:
            entries.append((Tag.CURSOR, cursor))
        stream_id = self._next_id
        self._next_id += 1
        stream = FileStream(self, stream_id, op, path)
        self._files[stream_id] = stream
        await self._send(Frame(MsgType.FILE_REQ, stream_id, encode_tlv(entries)))
        return stream

    async def ping(self, payload: bytes | None = None) -> float:
        """Round trip through the agent; returns seconds."""
        self._check_open()
        payload = payload or time.perf_counter_ns().to_bytes(8, "little")
        if len(payload) > MAX_PING:
            raise BadRequestError(f"ping payload is limited to {MAX_PING} bytes")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[payload] = fut
        t0 = time.perf_counter()
        await self._send(Frame(MsgType.PING, 0, payload))
        await fut
        return time.perf_counter() - t0

    async def shutdown(self) -> None:
        """Ask the agent to stop every process and power off. Does not wait."""
        if self._closed is None:
            await self._send(Frame(MsgType.SHUTDOWN, 0))
