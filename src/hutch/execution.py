"""Processes running in a box: :class:`Execution` (streaming) and :class:`ExecResult` (finished).

An :class:`Execution` wraps a portal :class:`~hutch.portal.ProcessStream`. Output is pulled by the
consumer: credit goes back to the guest only as chunks are taken, so a slow consumer slows the guest
process instead of filling host memory. :meth:`Execution.wait` drains whatever output has not been
consumed into the result, so waiting without reading can never deadlock.

A process started with ``tty=True`` runs on a pseudo-terminal in the guest: everything it writes
arrives on ``stdout`` as the terminal shows it (``\r\n`` line ends, echoed input), ``stderr``
stays empty, input goes through the terminal's line discipline (Ctrl-C = ``b"\x03"`` interrupts
the foreground job) and :meth:`Execution.resize` changes the window size.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import signal as signal_mod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hutch.errors import (
    BadRequestError,
    ExecutionError,
    OutputLimitError,
    PortalError,
    TimeoutError,
)
from hutch.portal import ExitInfo, ProcessStream

DEFAULT_MAX_OUTPUT = 256 << 20
#: Extra host-side patience after a guest-enforced timeout before the host gives up on the guest.
HOST_TIMEOUT_GRACE = 5.0
#: A terminal's size when none is given: (rows, columns).
DEFAULT_TERMINAL_SIZE = (24, 80)


def terminal_size(rows: int, cols: int) -> tuple[int, int]:
    """Validate a terminal size; BadRequestError unless both are 1 to 65535."""
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise BadRequestError(
                f"terminal {name} must be an integer from 1 to 65535, not {value!r}"
            )
    return rows, cols


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a finished command. ``stdout``/``stderr`` are decoded text (UTF-8,
    undecodable bytes replaced); the raw bytes are in ``stdout_bytes``/``stderr_bytes``."""

    command: list[str]
    exit_code: int | None
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    duration_ms: float = 0.0
    pid: int | None = None
    _text: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def stdout(self) -> str:
        if "out" not in self._text:
            self._text["out"] = self.stdout_bytes.decode("utf-8", "replace")
        return self._text["out"]

    @property
    def stderr(self) -> str:
        if "err" not in self._text:
            self._text["err"] = self.stderr_bytes.decode("utf-8", "replace")
        return self._text["err"]

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal_mod.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"

    def assert_success(self) -> ExecResult:
        """Return self if the command exited 0, else raise :class:`ExecutionError`."""
        if self.exit_code != 0:
            raise ExecutionError(
                self.command, self.exit_code, self.stdout, self.stderr, signal=self.signal
            )
        return self


class ChunkReader:
    """An output stream fed through a queue (``None`` = end of output), shared by local and
    remote executions: ``read_chunk()``, ``async for chunk in stream`` and a bounded ``read()``.
    Subclasses say what consuming a chunk gives back (credit to the guest, an ack to the
    server) in :meth:`_consumed`."""

    _fd: int
    _queue: asyncio.Queue[bytes | None]
    _eof: bool
    consumed_bytes: int

    async def read_chunk(self) -> bytes:
        """The next chunk, or ``b""`` at end of output."""
        if self._eof:
            return b""
        chunk = await self._queue.get()
        if chunk is None:
            self._eof = True
            self._queue.put_nowait(None)  # wakes a concurrent reader (e.g. wait()) too
            return b""
        self.consumed_bytes += len(chunk)
        await self._consumed(len(chunk))
        return chunk

    async def _consumed(self, n: int) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def read(self, limit: int = DEFAULT_MAX_OUTPUT) -> bytes:
        """All remaining output. Raises :class:`OutputLimitError` past ``limit`` bytes."""
        parts: list[bytes] = []
        total = 0
        while chunk := await self.read_chunk():
            total += len(chunk)
            if total > limit:
                raise OutputLimitError(
                    f"output of {self._command()!r} exceeded {limit} bytes on fd {self._fd}"
                )
            parts.append(chunk)
        return b"".join(parts)


class OutputStream(ChunkReader):
    """One output fd of a process: ``async for chunk in stream`` or ``await stream.read()``."""

    def __init__(self, proc: ProcessStream, fd: int) -> None:
        self._proc = proc
        self._fd = fd
        self._queue = proc.queues[fd]
        self._eof = False
        self.consumed_bytes = 0

    async def _consumed(self, n: int) -> None:
        self._proc.consumed(self._fd, n)  # credit back to the guest

    def _command(self) -> list[str]:
        return list(self._proc.argv)


class InputStream:
    """The stdin of a process: ``await write(data)``, ``await close()``. Writes wait for credit."""

    def __init__(self, proc: ProcessStream) -> None:
        self._proc = proc

    async def write(self, data: bytes) -> None:
        await self._proc.write_stdin(data)

    async def close(self) -> None:
        await self._proc.close_stdin()


class Execution:
    """A process running in a box (from :meth:`hutch.Box.spawn`)."""

    def __init__(
        self,
        proc: ProcessStream,
        pid: int,
        timeout: float | None,
        max_output: int,
        *,
        tty: bool = False,
    ) -> None:
        self._proc = proc
        self.pid = pid
        #: True if the process runs on a terminal (``spawn(tty=True)``).
        self.tty = tty
        self.command = list(proc.argv)
        self.stdout = OutputStream(proc, 1)
        self.stderr = OutputStream(proc, 2)
        self.stdin = InputStream(proc)
        self._timeout = timeout
        self._max_output = max_output
        self._result: ExecResult | None = None

    @property
    def id(self) -> int:
        return self._proc.id

    async def signal(self, signo: int | signal_mod.Signals, *, group: bool = False) -> None:
        """Send a signal to the process (or its whole process group)."""
        await self._proc.signal(int(signo), group=group)

    async def kill(self) -> None:
        """SIGKILL the process and everything in its process group."""
        await self._proc.signal(int(signal_mod.SIGKILL), group=True)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size; its foreground process gets ``SIGWINCH``."""
        if not self.tty:
            raise BadRequestError(
                f"{self.command!r} has no terminal to resize",
                hint="Start it with spawn(..., tty=True).",
            )
        await self._proc.resize(*terminal_size(rows, cols))

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the exit; output not consumed yet is collected into the result.

        ``timeout`` (seconds) bounds this wait on the host; on expiry the process group is killed
        and :class:`TimeoutError` is raised. A guest-enforced ``timeout`` given at spawn also
        raises :class:`TimeoutError` after the process was killed.
        """
        if self._result is not None:
            return self._result
        deadline = timeout
        if deadline is None and self._timeout is not None:
            deadline = self._timeout + HOST_TIMEOUT_GRACE
        try:
            out, err, info = await asyncio.wait_for(self._collect(), deadline)
        except builtins.TimeoutError:
            await self._kill_quietly()
            raise TimeoutError(
                f"{self.command!r} did not finish within {deadline:g} s; it was killed",
                hint="Pass a larger timeout, or stream its output with spawn().",
            ) from None
        except OutputLimitError:
            await self._kill_quietly()
            raise
        result = ExecResult(
            command=self.command,
            exit_code=info.exit_code,
            stdout_bytes=out,
            stderr_bytes=err,
            signal=info.signal,
            timed_out=info.timed_out,
            duration_ms=info.duration_us / 1000.0,
            pid=self.pid,
        )
        self._result = result
        if info.timed_out:
            raise TimeoutError(
                f"{self.command!r} exceeded its timeout of {self._timeout:g} s and was killed "
                f"(after {result.duration_ms:.0f} ms)",
                hint="Pass a larger timeout=, or None for no limit.",
            )
        return result

    async def _collect(self) -> tuple[bytes, bytes, ExitInfo]:
        out, err = await asyncio.gather(
            self.stdout.read(self._max_output), self.stderr.read(self._max_output)
        )
        info = await self._proc.exited
        return out, err, info

    async def _kill_quietly(self) -> None:
        # Bounded: the kill must not hang on a guest that stopped reading the portal.
        with contextlib.suppress(PortalError, builtins.TimeoutError):
            await asyncio.wait_for(self.kill(), 5.0)

    async def __aenter__(self) -> Execution:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._result is None and not self._proc.closed:
            await self._kill_quietly()
