"""Starting and supervising one QEMU process.

No QEMU may outlive its owner: QEMU is started through util-linux ``setpriv --pdeathsig KILL``, so
the kernel sends it SIGKILL when the thread that started it dies — also when the Python process is
killed with SIGKILL and no Python code runs. Orderly stops escalate: the caller's guest shutdown,
then QMP ``quit``, then SIGTERM, then SIGKILL, each with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from hutch.errors import EngineError
from hutch.vm.cmdline import VmSpec, qemu_command

log = logging.getLogger("hutch.vm")
# qemu.qmp logs every failed connection at ERROR; hutch reports QMP failures as EngineError itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

QMP_TIMEOUT = 2.0
#: While QEMU starts, how often to retry connecting to its QMP socket.
QMP_RETRY = 0.002


#: The guest writes the serial console; its log is capped so a hostile guest cannot fill the disk.
CONSOLE_LOG_MAX = 8 << 20
CONSOLE_LOG_KEEP = 256 << 10
CONSOLE_CHECK_INTERVAL = 2.0


def cap_log(path: Path, max_bytes: int = CONSOLE_LOG_MAX, keep: int = CONSOLE_LOG_KEEP) -> bool:
    """If ``path`` grew past ``max_bytes``, keep only its last ``keep`` bytes (behind a marker).

    The writer must append (QEMU's ``append=on``), so its next write lands after the kept tail.
    Returns whether the file was cut.
    """
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            return False
        with path.open("r+b") as f:
            f.seek(size - keep)
            kept = f.read(keep)
            f.seek(0)
            f.truncate(0)
            f.write(f"[hutch: log exceeded {max_bytes} bytes; older output dropped]\n".encode())
            f.write(kept)
    except OSError:
        return False
    return True


def tail(path: Path, max_lines: int = 30, max_bytes: int = 16384) -> str:
    """The last lines of a (guest-written, so untrusted) log file, bounded in size."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-max_lines:])


class QmpSession:
    """One QMP connection used for a sequence of commands (snapshot, restore); every command is
    bounded by its own timeout and QMP errors become :class:`EngineError`."""

    def __init__(self, client: QMPClient, pid: int) -> None:
        self.client = client
        self.pid = pid

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = QMP_TIMEOUT
    ) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), timeout)
        except TimeoutError:
            raise EngineError(f"QMP {command} got no answer within {timeout:g} s") from None
        except Exception as e:
            raise EngineError(f"QMP {command} failed: {e}") from e

    def send_fd(self, fd: int) -> None:
        """Pass a file descriptor to QEMU (SCM_RIGHTS); name it with ``getfd`` next."""
        try:
            self.client.send_fd_scm(fd)
        except Exception as e:
            raise EngineError(f"passing a file descriptor to QEMU failed: {e}") from e


class QemuProcess:
    """A running QEMU; created by :meth:`start`."""

    def __init__(
        self, proc: asyncio.subprocess.Process, spec: VmSpec, log_path: Path, log_offset: int = 0
    ) -> None:
        self._proc = proc
        self.spec = spec
        self.log_path = log_path
        #: Where this QEMU's output starts in ``log_path`` (earlier runs appended before it).
        self.log_offset = log_offset
        self.pid = proc.pid

    @classmethod
    async def start(
        cls,
        spec: VmSpec,
        log_path: Path,
        binary: str | None = None,
        *,
        pass_fds: Sequence[int] = (),
    ) -> QemuProcess:
        """Start QEMU for ``spec`` (from the event-loop thread: ``--pdeathsig`` is per thread).

        ``pass_fds`` stay open in QEMU under their numbers (e.g. a snapshot's state file for
        ``migrate-incoming fd:N``)."""
        qemu = binary or shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise EngineError(
                "qemu-system-x86_64 is not installed",
                hint="Run `hutch setup` (installs qemu-system-x86), or `apt-get install qemu-system-x86`.",
            )
        setpriv = shutil.which("setpriv")
        argv = [*spec.launcher, *qemu_command(spec, qemu)]
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        else:  # pragma: no cover - util-linux is essential on Debian
            log.warning("setpriv not found: QEMU may outlive a killed owner process")
        with log_path.open("ab") as out:
            log_offset = out.tell()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # Ctrl-C in a terminal goes to us, not to QEMU
                    pass_fds=tuple(pass_fds),
                )
            except OSError as e:
                raise EngineError(f"could not start QEMU: {e}") from e
        log.debug("started qemu pid %d: %s", proc.pid, " ".join(argv))
        return cls(proc, spec, log_path, log_offset)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for exit; returns the exit status, or None if still running after ``timeout``."""
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            return None

    def diagnostics(self) -> str:
        """QEMU's own messages and the tail of the guest console, for error messages."""
        parts = []
        qemu_out = tail(self.log_path, 10)
        if qemu_out:
            parts.append("QEMU said:\n" + qemu_out)
        console = tail(self.spec.console_log, 25)
        parts.append("console tail:\n" + (console or "(the guest printed nothing)"))
        return "\n".join(parts)

    async def guard_console(self) -> None:
        """Runs while QEMU runs: keeps the console log under ``CONSOLE_LOG_MAX``."""
        while self.running:
            cap_log(self.spec.console_log, CONSOLE_LOG_MAX, CONSOLE_LOG_KEEP)
            await asyncio.sleep(CONSOLE_CHECK_INTERVAL)

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command (connects for the call; bounded by ``QMP_TIMEOUT``)."""
        client = QMPClient(f"hutch-{self.pid}")
        try:
            await asyncio.wait_for(client.connect(str(self.spec.qmp_socket)), QMP_TIMEOUT)
            return await asyncio.wait_for(client.execute(command, arguments), QMP_TIMEOUT)
        except Exception as e:
            raise EngineError(f"QMP {command} failed: {e}") from e
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), QMP_TIMEOUT)

    @contextlib.asynccontextmanager
    async def qmp_session(self, deadline: float | None = None) -> AsyncIterator[QmpSession]:
        """A QMP connection for several commands. While QEMU is starting its socket may not exist
        yet: connecting is retried until ``deadline`` (``time.monotonic()``; default: now +
        ``QMP_TIMEOUT``), and given up at once if QEMU exits."""
        if deadline is None:
            deadline = time.monotonic() + QMP_TIMEOUT
        sock = self.spec.qmp_socket
        while not sock.exists() and self.running and time.monotonic() < deadline:
            await asyncio.sleep(QMP_RETRY)  # a cheap check while QEMU starts
        while True:
            client = QMPClient(f"hutch-{self.pid}")
            try:
                left = max(0.001, deadline - time.monotonic())
                await asyncio.wait_for(client.connect(str(self.spec.qmp_socket)), left)
                break
            except Exception as e:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), QMP_TIMEOUT)
                if not self.running:
                    raise EngineError(
                        f"QEMU exited with status {self.returncode} before QMP answered\n"
                        f"{self.diagnostics()}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise EngineError(f"could not connect to QEMU's QMP socket: {e}") from e
                await asyncio.sleep(QMP_RETRY)
        try:
            yield QmpSession(client, self.pid)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), QMP_TIMEOUT)

    async def stop(self, grace: float = 2.0) -> int | None:
        """QMP quit, then SIGTERM, then SIGKILL; returns the exit status."""
        if not self.running:
            return self.returncode
        with contextlib.suppress(EngineError):
            await self.qmp("quit")
        if (rc := await self.wait(grace)) is not None:
            return rc
        self.signal(signal.SIGTERM)
        if (rc := await self.wait(grace)) is not None:
            return rc
        self.kill()
        return await self.wait(5.0)

    def signal(self, signo: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signo)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
