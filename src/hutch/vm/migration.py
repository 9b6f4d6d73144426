"""Machine state in and out of QEMU through its migration stream (QEMU 7.2, no ``file:`` URI).

**Saving** (:func:`save_state`): the VM is paused (QMP ``stop``) and migrated into a file that the
host opened and passed to QEMU over QMP (``getfd`` + ``migrate fd:NAME``). With the capability
``x-ignore-shared``, RAM in a *shared* ``memory-backend-file`` is not streamed at all: the state
file holds only device and CPU state (tens of KiB), and the caller copies the RAM file itself
while the VM stays paused. After the migration QEMU's block layer is flushed and inactive, so the
disk files are consistent too; QMP ``cont`` (by the caller) re-activates them and resumes.

**Loading** (:func:`load_state`): QEMU is started with the same machine command line plus
``-incoming defer -S`` (:class:`~hutch.vm.cmdline.VmSpec` ``incoming``) and the RAM file mapped
privately; the state file is inherited as a plain fd and read with ``migrate-incoming fd:N``.
QEMU stays paused afterwards until ``cont``.

Every wait polls with a deadline; a failed migration is an :class:`EngineError` with QEMU's reason.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from hutch.errors import EngineError, TimeoutError
from hutch.vm.process import QmpSession

#: No bandwidth cap while saving (QEMU's default of 32 MiB/s would dominate the pause).
MAX_BANDWIDTH = 1 << 40
#: Poll interval while a migration runs (the state file is small: it completes in milliseconds).
POLL = 0.001
FD_NAME = "hutch-state"


def _ignore_shared() -> dict[str, Any]:
    return {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


def _left(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())


async def _wait_migration(qmp: QmpSession, deadline: float, what: str) -> None:
    while True:
        info = await qmp.execute("query-migrate", timeout=_left(deadline))
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc", "no reason given")
            raise EngineError(f"{what} failed: {reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish in time (status {status})")
        await asyncio.sleep(POLL)


async def save_state(qmp: QmpSession, state_file: Path, deadline: float) -> int:
    """Pause the VM and write its device state to ``state_file``; returns the file's size.

    The VM stays paused (QEMU's run state ``postmigrate``); the caller copies the RAM and disk
    files and then resumes it with ``cont`` — also when this raises."""
    await qmp.execute("migrate-set-capabilities", _ignore_shared())
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await qmp.execute("stop")
        qmp.send_fd(fd)
        await qmp.execute("getfd", {"fdname": FD_NAME})
    finally:
        os.close(fd)  # QEMU has its own copy now
    await qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
    await _wait_migration(qmp, deadline, "saving the VM state")
    return state_file.stat().st_size


async def load_state(qmp: QmpSession, fd: int, deadline: float) -> None:
    """Read the machine state from ``fd`` (inherited by QEMU under that number, which was
    started with ``incoming``); returns once QEMU holds it, paused."""
    await qmp.execute("migrate-set-capabilities", _ignore_shared())
    await qmp.execute("migrate-incoming", {"uri": f"fd:{fd}"})
    await _wait_migration(qmp, deadline, "loading the VM state")


async def wait_chardev_open(qmp: QmpSession, label: str, deadline: float) -> None:
    """Wait until QEMU has accepted a client on the socket chardev ``label``.

    A client's ``connect()`` returns once the kernel queued it; QEMU accepts it later in its main
    loop. Resuming a restored VM before that would tell the guest its port was closed."""
    while True:
        devices = await qmp.execute("query-chardev", timeout=_left(deadline))
        for dev in devices if isinstance(devices, list) else []:
            if isinstance(dev, dict) and dev.get("label") == label:
                filename = str(dev.get("filename", ""))
                if not filename.startswith("disconnected"):
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU did not accept the connection to its {label} socket")
        await asyncio.sleep(POLL)


__all__ = ["load_state", "save_state", "wait_chardev_open"]
