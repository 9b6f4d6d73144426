"""The multiplexed host side of the portal: one reader task, many process streams.

A :class:`PortalChannel` owns the connection to the guest agent (QEMU's Unix socket for the
``hutch.portal`` virtio-serial port, or the agent's test socket). It decodes frames with the bounded
:class:`~hutch.portal.codec.FrameDecoder`, routes them to :class:`ProcessStream` objects by stream id
and enforces the flow-control windows of docs/PROTOCOL.md §5, so the host never holds more than one
window of unread output per fd.

Any protocol violation closes the channel: every waiting caller gets the :class:`PortalError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hutch.errors import BadRequestError, HutchError, NotFoundError, PortalError
from hutch.portal.codec import (
    INITIAL_WINDOW,
    MAX_ARGS,
    MAX_DATA,
    MAX_PAYLOAD,
    MAX_PING,
    PROTOCOL_VERSION,
    Fields,
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


@dataclass(frozen=True)
class Hello:
    version: int
    agent: str
    kernel: str
    boot_start_us: int
    boot_ready_us: int


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


class PortalChannel:
    """The host end of one guest's portal connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder()
        self._streams: dict[int, ProcessStream] = {}
        self._next_id = 1
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = loop.create_future()
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._closed: BaseException | None = None
        self.closed_event = asyncio.Event()
        self._task = loop.create_task(self._read_loop(), name="hutch-portal-reader")

    # --- lifecycle ------------------------------------------------------------------------
    @classmethod
    async def connect_unix(cls, path: str) -> PortalChannel:
        reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK)
        return cls(reader, writer)

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
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._pongs.clear()
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
            raise PortalError(f"guest sent {t.name} before HELLO")
        if t is MsgType.PONG:
            fut = self._pongs.pop(frame.payload, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
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
        if self.hello.done():
            raise PortalError("guest sent a second HELLO")
        f = decode_tlv(frame.payload)
        version = f.u(Tag.VERSION)
        if version != PROTOCOL_VERSION:
            raise PortalError(
                f"guest agent speaks portal protocol {version}, this host speaks "
                f"{PROTOCOL_VERSION}",
                hint="Run `hutch setup` to rebuild the guest agent and initramfs.",
            )
        self.hello.set_result(
            Hello(
                version=version,
                agent=f.text(Tag.AGENT, "", limit=64) or "",
                kernel=f.text(Tag.KERNEL, "", limit=256) or "",
                boot_start_us=f.u(Tag.BOOT_START_US, 0) or 0,
                boot_ready_us=f.u(Tag.BOOT_READY_US, 0) or 0,
            )
        )

    # --- writing --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed is not None:
            if isinstance(self._closed, HutchError):
                raise PortalError(f"portal is closed: {self._closed.message}")
            raise PortalError(f"portal is closed: {self._closed}")

    def _send_nowait(self, frame: Frame) -> None:
        if self._closed is not None:
            return
        try:
            self._writer.write(frame.encode())
        except (OSError, RuntimeError) as e:
            self._fail(PortalError(f"portal write failed: {e}"))

    async def _send(self, frame: Frame) -> None:
        self._check_open()
        try:
            self._writer.write(frame.encode())
            await self._writer.drain()
        except (OSError, RuntimeError) as e:
            self._fail(PortalError(f"portal write failed: {e}"))
            self._check_open()

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
