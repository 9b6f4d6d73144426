"""Crash recovery: what a killed runtime process left behind, put right by the next one.

A box in an active state (``starting``, ``running``, ``stopping``) is owned by the process running
its QEMU (:class:`~hutch.runtime.store.ProcessIdentity`: pid + start time + boot id, so a reused pid
is not mistaken for the owner). When that process is gone, :func:`recover`:

1. **takes the box over** with one compare-and-set (``claim(state="stopping",
   expect_revision=…)``): only the recovering process whose snapshot of the row is still current
   wins; a second process recovering at the same time loses the CAS and leaves the box alone, and a
   box that was restarted meanwhile (new revision, live owner) is never touched;
2. **kills its QEMU** if it is still alive *and identifiable*: ``/proc/PID/cmdline`` must be a
   ``qemu-system-*`` whose arguments contain the box id, owned by this user. The pid is pinned with
   a pidfd before the check, so a pid reused in between cannot be signalled. Anything else (say the
   pid now belongs to an editor) is left alone;
3. removes its run folder (``RUN/<id>/``: sockets, RAM file) and marks it ``stopped`` (it was
   running or stopping: its disk is kept) or ``failed`` (it was starting), releasing ownership and
   recording a ``recovered`` event that says why; an ``auto_remove`` box is then removed (row and
   folder), as its owner would have done. A recovery killed half way leaves the box
   ``stopping`` with a dead owner, which the next recovery finishes.

A box that was waiting in a warm pool (``pool`` set: :mod:`hutch.runtime.pool`) was nobody's
box yet, so it is removed outright (row and folder), never left as a stopped box; so is a pool
row that is not running and unchanged for ``orphan_age`` seconds (a pool removes its failed
restores at once, so such a row is a leftover of a crash).

Then it reclaims orphans: run folders whose box has no live owner (neither in this store nor by its
``owner`` file), QEMU processes (of this user, ``qemu-system-*`` with a run folder under RUN in their
arguments) whose box has no live owner, and box folders ``HOME/boxes/<id>/`` that have no row in the
store and were not touched for ``orphan_age`` seconds. Every step is idempotent, so two processes
may run :func:`recover` at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from hutch.errors import ConflictError, InvalidStateError, NotFoundError
from hutch.paths import HutchPaths
from hutch.runtime.store import (
    ACTIVE_STATES,
    ID_RE,
    BoxRecord,
    BoxStore,
    ProcessIdentity,
    boot_id,
    read_proc_stat,
)

log = logging.getLogger("hutch.runtime")

#: Box folders younger than this (seconds since their last change) are never reclaimed.
ORPHAN_AGE = 60.0
#: Run folders and QEMU processes younger than this may belong to a box being started right now.
STARTUP_GRACE = 10.0
#: After SIGTERM, how long a QEMU gets before SIGKILL.
KILL_GRACE = 2.0


@dataclass(frozen=True)
class RecoveredBox:
    id: str
    was: str
    now: str
    reason: str
    #: The pid of the QEMU that recovery killed, if it killed one.
    qemu_killed: int | None = None


@dataclass
class RecoveryReport:
    boxes: list[RecoveredBox] = field(default_factory=list)
    #: QEMU pids killed (of recovered boxes, and orphans).
    killed: list[int] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    box_dirs: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.boxes or self.killed or self.run_dirs or self.box_dirs)

    def summary(self) -> str:
        if not self:
            return "nothing to recover"
        parts = []
        if self.boxes:
            parts.append(f"{len(self.boxes)} box(es) recovered")
        if self.killed:
            parts.append(f"{len(self.killed)} QEMU process(es) killed")
        if self.run_dirs:
            parts.append(f"{len(self.run_dirs)} run folder(s) removed")
        if self.box_dirs:
            parts.append(f"{len(self.box_dirs)} orphan box folder(s) removed")
        return ", ".join(parts)


# --- processes ------------------------------------------------------------------------------
def _cmdline(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in data.split(b"\0") if a]


def _ours(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def is_qemu_of(pid: int, box_id: str) -> bool:
    """Is ``pid`` a live QEMU of this user whose command line names ``box_id``?"""
    argv = _cmdline(pid)
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    stat = read_proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return _ours(pid) and any(box_id in a for a in argv[1:])


def _running(pid: int) -> bool:
    stat = read_proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def kill_qemu(pid: int, box_id: str, grace: float = KILL_GRACE) -> bool:
    """SIGTERM (then SIGKILL after ``grace``) the QEMU ``pid`` of ``box_id`` — only if
    :func:`is_qemu_of` says it is one. Returns whether it was killed."""
    pidfd: int | None = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)  # pins this process: a reused pid cannot be signalled by it
    try:
        if not is_qemu_of(pid, box_id):
            return False

        def send(sig: signal.Signals) -> bool:
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                return False
            except PermissionError:
                log.warning("box %s: not allowed to signal its QEMU (pid %d)", box_id, pid)
                return False
            return True

        if not send(signal.SIGTERM):
            return False
        deadline = time.monotonic() + grace
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _running(pid):
            send(signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def read_owner_file(run_dir: Path) -> ProcessIdentity | None:
    """The ``owner`` file of a run folder: ``PID`` or ``PID START`` (start as in /proc stat)."""
    try:
        parts = (run_dir / "owner").read_text().split()
        pid = int(parts[0])
        start = float(parts[1]) if len(parts) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    return ProcessIdentity(pid, start, None)


def _age(path: Path, now: float) -> float:
    """Seconds since ``path`` or anything directly in it last changed."""
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = path.lstat().st_mtime
        with os.scandir(path) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return now - newest


# --- recovery -------------------------------------------------------------------------------
def _recover_box(
    store: BoxStore,
    rec: BoxRecord,
    run_root: Path,
    boxes_root: Path,
    grace: float,
    report: RecoveryReport,
) -> RecoveredBox | None:
    """Take one box whose owner is dead over, kill its QEMU, mark it stopped/failed."""
    owner = rec.owner
    why = owner.why_dead() if owner is not None else "it has no owner process"
    try:
        mine = store.claim(
            rec.id,
            state="stopping",
            expect_revision=rec.revision,
            event=("recovering", f"{why}; it was {rec.state}"),
        )
    except (InvalidStateError, NotFoundError, ConflictError):
        return None  # changed since we looked: restarted, removed, or another process recovers it
    killed: int | None = None
    if rec.qemu_pid and (not rec.owner_boot or rec.owner_boot == boot_id()):
        if kill_qemu(rec.qemu_pid, rec.id, grace):
            killed = rec.qemu_pid
        elif _running(rec.qemu_pid):
            log.info("box %s: pid %d is not its QEMU any more; left alone", rec.id, rec.qemu_pid)
    run_dir = run_root / rec.id
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        report.run_dirs.append(run_dir)
    if killed is not None:
        report.killed.append(killed)
    now_state = "failed" if rec.state == "starting" else "stopped"
    detail = (
        f"{why}; "
        + (f"killed its QEMU (pid {killed})" if killed else "its QEMU was already gone")
        + f"; {rec.state} → {now_state}"
    )
    try:
        store.update_state(
            rec.id,
            now_state,
            expect_revision=mine.revision,
            release=True,
            qemu_pid=None,
            stopped_at=time.time(),
            failure=detail if now_state == "failed" else rec.failure,
            event=("recovered", detail),
        )
    except (InvalidStateError, NotFoundError):
        log.warning("box %s changed while it was being recovered; left as it is", rec.id)
        return None
    log.warning("box %s: %s", rec.id, detail)
    if rec.options.auto_remove or rec.pool is not None:  # ephemeral, or never handed out
        try:
            store.delete(rec.id, expect={now_state}, missing_ok=True)
        except InvalidStateError:
            return RecoveredBox(rec.id, rec.state, now_state, why, killed)  # restarted meanwhile
        shutil.rmtree(boxes_root / rec.id, ignore_errors=True)
        log.warning("box %s: removed (%s)", rec.id, "warm pool" if rec.pool else "auto_remove")
        now_state = "removed"
    return RecoveredBox(rec.id, rec.state, now_state, why, killed)


def _remove_pool_leftovers(
    store: BoxStore, boxes_root: Path, orphan_age: float, report: RecoveryReport
) -> None:
    """Warm-pool rows that are not active and have not changed for ``orphan_age`` seconds: what a
    pool that crashed between recording a box and starting it (or removing a failed one) left."""
    now = time.time()
    for rec in store.list(include_pool=True):
        if rec.pool is None or rec.active or now - rec.updated_at < orphan_age:
            continue
        try:
            gone = store.delete(rec.id, expect={rec.state}, missing_ok=True)
        except InvalidStateError:
            continue  # started meanwhile
        if gone:
            shutil.rmtree(boxes_root / rec.id, ignore_errors=True)
            log.warning("box %s: removed (a warm-pool box left %s)", rec.id, rec.state)
            report.boxes.append(
                RecoveredBox(rec.id, rec.state, "removed", "a warm-pool box that was left behind")
            )


def _held(box_id: str, rows: dict[str, BoxRecord], run_root: Path) -> bool:
    """Does a live process hold this box (as its store owner, or by its run folder's owner
    file)?"""
    rec = rows.get(box_id)
    if rec is not None and rec.active and rec.owner_alive():
        return True
    owner = read_owner_file(run_root / box_id)
    return owner is not None and owner.alive()


def _orphan_qemus(
    run_root: Path, rows: dict[str, BoxRecord], grace: float, startup_grace: float
) -> list[int]:
    """Kill QEMUs of this user running a box under ``run_root`` that no live process holds."""
    pattern = re.compile(re.escape(str(run_root)) + r"/([0-9a-f]{12,64})/")
    me = os.getuid()
    killed: list[int] = []
    now_since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock of /proc stat
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = _cmdline(pid)
        if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != me:
                continue
        ids = {m.group(1) for a in argv[1:] for m in [pattern.search(a)] if m}
        if len(ids) != 1:
            continue
        (box_id,) = ids
        stat = read_proc_stat(pid)
        if stat is None or now_since_boot - stat[1] < startup_grace:
            continue
        if _held(box_id, rows, run_root):
            continue
        if kill_qemu(pid, box_id, grace):
            log.warning("killed orphan QEMU pid %d of box %s (no live owner)", pid, box_id)
            killed.append(pid)
    return killed


def recover(
    store: BoxStore,
    paths: HutchPaths,
    *,
    run_root: Path | None = None,
    orphan_age: float = ORPHAN_AGE,
    kill_grace: float = KILL_GRACE,
    startup_grace: float = STARTUP_GRACE,
) -> RecoveryReport:
    """Put right what dead owners left behind (see the module docstring); returns what was done.

    ``run_root`` defaults to ``paths.run`` (``/dev/shm/hutch-<uid>``). Box folders younger than
    ``orphan_age`` seconds, and run folders (without an owner file) and QEMU processes younger than
    ``startup_grace``, may belong to a box being made right now and are left alone.
    """
    run_root = paths.run if run_root is None else run_root
    report = RecoveryReport()
    for rec in store.list(state=ACTIVE_STATES, include_pool=True):
        if rec.owner_alive():
            continue
        done = _recover_box(store, rec, run_root, paths.boxes, kill_grace, report)
        if done is not None:
            report.boxes.append(done)
    _remove_pool_leftovers(store, paths.boxes, orphan_age, report)

    rows = {r.id: r for r in store.list(include_pool=True)}
    if run_root.is_dir():
        with contextlib.suppress(OSError):
            report.killed += _orphan_qemus(run_root, rows, kill_grace, startup_grace)
        now = time.time()
        for d in sorted(run_root.iterdir()):
            if ID_RE.fullmatch(d.name) is None or not d.is_dir() or d.is_symlink():
                continue
            if _held(d.name, rows, run_root):
                continue
            if not (d / "owner").exists() and _age(d, now) < startup_grace:
                continue  # being made right now: its owner file is not written yet
            fresh = store.by_id(d.name)  # (re)started since the listing above?
            if fresh is not None and fresh.active and fresh.owner_alive():
                continue
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed the run folder %s (no live owner)", d)
            report.run_dirs.append(d)

    if paths.boxes.is_dir():
        rows = {r.id: r for r in store.list(include_pool=True)}  # created meanwhile: not orphans
        now = time.time()
        for d in sorted(paths.boxes.iterdir()):
            if ID_RE.fullmatch(d.name) is None or d.is_symlink() or not d.is_dir():
                continue
            if d.name in rows or _held(d.name, rows, run_root) or _age(d, now) < orphan_age:
                continue
            if store.by_id(d.name) is not None:  # inserted since the listing above
                continue
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed the orphan box folder %s (no box in the store)", d)
            report.box_dirs.append(d)
    if report:
        log.info("recovery: %s", report.summary())
    return report


__all__ = [
    "ORPHAN_AGE",
    "RecoveredBox",
    "RecoveryReport",
    "is_qemu_of",
    "kill_qemu",
    "read_owner_file",
    "recover",
]
