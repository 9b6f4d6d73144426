"""A process in a remote box, streamed over one WebSocket: :class:`RemoteExecution`.

It has the surface of :class:`hutch.Execution`: ``stdout``/``stderr`` are async iterables of bytes
(``read_chunk()``, ``read()``), ``stdin.write()/close()``, ``signal(n, group=)``, ``kill()`` and
``wait(timeout=)`` returning the same :class:`hutch.ExecResult`. Flow control carries through: the
server sends at most a window of unacknowledged bytes per stream, and this side acknowledges bytes
as the caller consumes them, so an unread stream pauses the guest process (never an unbounded
buffer); ``wait()`` collects unread output, so it cannot deadlock. Closing the stream before the
process exits (``async with`` ends, the client dies) makes the server kill the process group.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import signal as signal_mod
from typing import Any

from hutch.errors import (
    BadRequestError,
    ConnectionError,
    HutchError,
    OutputLimitError,
    PortalError,
    TimeoutError,
)
from hutch.execution import HOST_TIMEOUT_GRACE, ChunkReader, ExecResult, terminal_size
from hutch.server.wire import (
    CLOSE_SERVER_SHUTDOWN,
    MAX_CHUNK,
    STDERR,
    STDIN,
    STDOUT,
    WINDOW,
    error_from_body,
    result_from_json,
)

#: How long the server may take to start the process (it may wait on a busy guest).
SPAWN_TIMEOUT = 60.0


class RemoteOutputStream(ChunkReader):
    """One output stream: ``async for chunk in stream`` or ``await stream.read()``."""

    def __init__(self, execution: RemoteExecution, fd: int) -> None:
        self._ex = execution
        self._fd = fd
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._eof = False
        self._ended = False
        self._unacked = 0
        self.consumed_bytes = 0

    def _feed(self, data: bytes | None) -> None:
        if self._ended:
            return
        if data is None:
            self._ended = True
        self._queue.put_nowait(data)

    async def _consumed(self, n: int) -> None:
        self._unacked += n
        if self._unacked >= self._ex._window // 4:  # acknowledged in batches
            batch, self._unacked = self._unacked, 0
            await self._ex._send_control({"type": "ack", "stream": self._fd, "bytes": batch})

    def _command(self) -> list[str]:
        return list(self._ex.command)


class RemoteInputStream:
    """The process's stdin: ``await write(data)``, ``await close()``. Writes wait for credit."""

    def __init__(self, execution: RemoteExecution) -> None:
        self._ex = execution
        self._credit = WINDOW
        self._wakeup = asyncio.Event()
        self._closed = False

    def _ack(self, n: int) -> None:
        self._credit = min(self._credit + n, WINDOW)
        self._wakeup.set()

    async def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        while view:
            if self._closed:
                raise BadRequestError("stdin of this process is already closed")
            while self._credit == 0 and not self._ex._finished:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._ex._finished:
                return  # the process is gone; like writing to a closed pipe, the data is dropped
            n = min(len(view), self._credit, MAX_CHUNK)
            self._credit -= n
            await self._ex._send(bytes([STDIN]) + bytes(view[:n]))
            view = view[n:]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._ex._finished:
            await self._ex._send_control({"type": "stdin_close"})


class RemoteExecution:
    """A process running in a remote box (from :meth:`RemoteBox.spawn`)."""

    def __init__(
        self,
        ws: Any,
        *,
        command: list[str],
        pid: int,
        window: int,
        timeout: float | None,
        max_output: int,
        address: str,
        tty: bool = False,
    ) -> None:
        self._ws = ws
        self.pid = pid
        #: True if the process runs on a terminal (``spawn(tty=True)``).
        self.tty = tty
        self.command = command
        self._window = max(1, window)
        self._timeout = timeout
        self._max_output = max_output
        self._address = address
        self.stdout = RemoteOutputStream(self, STDOUT)
        self.stderr = RemoteOutputStream(self, STDERR)
        self.stdin = RemoteInputStream(self)
        self._exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._finished = False  # the exit (or an error) arrived, or the stream broke
        self._result: ExecResult | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        transport: Any,
        path: str,
        request: dict[str, Any],
        *,
        timeout: float | None,
        max_output: int,
    ) -> RemoteExecution:
        ws = await transport.websocket(path)
        try:
            await ws.send(json.dumps(request))
            first = await asyncio.wait_for(ws.recv(), SPAWN_TIMEOUT)
            msg = json.loads(first) if isinstance(first, str) else {}
        except builtins.TimeoutError:
            await ws.close()
            raise TimeoutError(
                f"the hutch server did not start {request.get('cmd')!r} within {SPAWN_TIMEOUT:g} s"
            ) from None
        except Exception as e:
            await ws.close()
            raise transport.dropped(e, "spawn") from None
        if msg.get("type") != "started":
            await ws.close()
            if msg.get("type") == "error":
                raise error_from_body(msg)
            raise PortalError(f"unexpected first message from the hutch server: {msg!r}")
        return cls(
            ws,
            command=list(request.get("cmd") or []),
            pid=int(msg["pid"]),
            window=int(msg.get("window", WINDOW)),
            timeout=timeout,
            max_output=max_output,
            address=transport.address.url,
            tty=bool(request.get("tty")),
        )

    # --- the connection -------------------------------------------------------------------
    async def _send(self, data: bytes | str) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(data)
        except ConnectionClosed:
            if not self._finished:
                raise self._broken("sending") from None

    async def _send_control(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(HutchError):  # after the exit there is nobody to tell
            await self._send(json.dumps(msg))

    def _broken(self, what: str, code: int | None = None) -> ConnectionError:
        why = "the server shut down" if code == CLOSE_SERVER_SHUTDOWN else "the connection broke"
        return ConnectionError(
            f"the stream of {self.command!r} from {self._address} ended before the process "
            f"exited while {what}: {why}",
            hint="The process was killed by the server. Start it again once the server is back.",
        )

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        code: int | None = None
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    if message and message[0] in (STDOUT, STDERR):
                        stream = self.stdout if message[0] == STDOUT else self.stderr
                        stream._feed(message[1:])
                    continue
                self._dispatch(json.loads(message))
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
        except (ValueError, OSError):
            pass
        finally:
            if code is None and self._ws.close_code is not None:
                code = self._ws.close_code
            self._finish(self._broken("reading", code))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "eof":
            stream = self.stdout if msg.get("stream") == STDOUT else self.stderr
            stream._feed(None)
        elif kind == "stdin_ack":
            self.stdin._ack(int(msg.get("bytes", 0)))
        elif kind == "exit":
            if not self._exit.done():
                self._exit.set_result(msg)
            self._finish(None)
        elif kind == "error":
            if not self._exit.done():
                self._exit.set_exception(error_from_body(msg))
            self._finish(None)
        # "warning" (a control message the server could not apply) and unknown types: ignored

    def _finish(self, error: HutchError | None) -> None:
        self._finished = True
        if error is not None and not self._exit.done():
            self._exit.set_exception(error)
        self.stdout._feed(None)
        self.stderr._feed(None)
        self.stdin._wakeup.set()

    # --- the process ----------------------------------------------------------------------
    @property
    def id(self) -> int:
        return self.pid

    async def signal(self, signo: int | signal_mod.Signals, *, group: bool = False) -> None:
        """Send a signal to the process (or its whole process group)."""
        n = int(signo)
        if not 1 <= n <= 64:
            raise BadRequestError(f"signal number {n} is out of range 1..64")
        if not self._finished:
            await self._send_control({"type": "signal", "signal": n, "group": group})

    async def kill(self) -> None:
        """SIGKILL the process and everything in its process group."""
        if not self._finished:
            await self._send_control({"type": "kill"})

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (see :meth:`hutch.Execution.resize`)."""
        if not self.tty:
            raise BadRequestError(
                f"{self.command!r} has no terminal to resize",
                hint="Start it with spawn(..., tty=True).",
            )
        rows, cols = terminal_size(rows, cols)
        if not self._finished:
            await self._send_control({"type": "resize", "rows": rows, "cols": cols})

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the exit; output not consumed yet is collected into the result (see
        :meth:`hutch.Execution.wait`: the same deadlines and errors)."""
        if self._result is not None:
            return self._result
        deadline = timeout
        if deadline is None and self._timeout is not None:
            deadline = self._timeout + HOST_TIMEOUT_GRACE
        try:
            out, err, exit_msg = await asyncio.wait_for(self._collect(), deadline)
        except builtins.TimeoutError:
            await self._kill_quietly()
            raise TimeoutError(
                f"{self.command!r} did not finish within {deadline:g} s; it was killed",
                hint="Pass a larger timeout, or stream its output with spawn().",
            ) from None
        except OutputLimitError:
            await self._kill_quietly()
            raise
        finally:
            if self._finished:
                await self._close()
        self._result = result_from_json(exit_msg, stdout=out, stderr=err)
        return self._result

    async def _collect(self) -> tuple[bytes, bytes, dict[str, Any]]:
        out, err = await asyncio.gather(
            self.stdout.read(self._max_output), self.stderr.read(self._max_output)
        )
        return out, err, await self._exit

    async def _kill_quietly(self) -> None:
        with contextlib.suppress(HutchError, builtins.TimeoutError):
            await asyncio.wait_for(self.kill(), 5.0)

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()
        if not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def __aenter__(self) -> RemoteExecution:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._result is None and not self._finished:
            await self._kill_quietly()
        await self._close()

    def __repr__(self) -> str:
        return f"<RemoteExecution pid {self.pid} {self.command!r}>"


__all__ = ["RemoteExecution", "RemoteInputStream", "RemoteOutputStream"]
