"""Crash recovery with real processes (no VMs): a runtime process that owns boxes is SIGKILLed, and
recovery puts its boxes right, without ever touching live owners or processes that are not QEMU."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hutch.paths import HutchPaths
from hutch.runtime import recovery
from hutch.runtime.options import BoxOptions
from hutch.runtime.recovery import is_qemu_of, kill_qemu, recover
from hutch.runtime.store import BoxRecord, BoxStore, ProcessIdentity

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))

#: A stand-in runtime process: claims boxes (with their states and QEMU pids), makes their run
#: folders with its pid as owner, says "ready" and waits to be killed.
OWNER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from hutch.runtime.store import BoxStore
    store = BoxStore(Path(sys.argv[1]))
    run_root = Path(sys.argv[2])
    for box_id, state, qemu_pid in json.loads(sys.argv[3]):
        store.claim(box_id, state=state, qemu_pid=qemu_pid)
        (run_root / box_id).mkdir(parents=True)
        (run_root / box_id / "owner").write_text(str(os.getpid()))
        (run_root / box_id / "portal.sock").write_text("")
    print("ready", flush=True)
    time.sleep(600)
    """
)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.paths = HutchPaths(tmp / "home")
        self.paths.boxes.mkdir(parents=True)
        self.run_root = tmp / "run"
        self.run_root.mkdir()
        self.store = BoxStore.for_home(self.paths)
        self.procs: list[subprocess.Popen[bytes]] = []

    def box(self, name: str | None = None, *, auto_remove: bool = False) -> str:
        rec = self.store.insert(BoxRecord.new(BoxOptions(name=name, auto_remove=auto_remove)))
        (self.paths.boxes / rec.id).mkdir()
        (self.paths.boxes / rec.id / "disk.qcow2").write_bytes(b"disk")
        return rec.id

    def spawn(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        p: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def fake_qemu(self, box_id: str) -> subprocess.Popen[bytes]:
        """A process that looks like this box's QEMU: argv[0] qemu-system-x86_64, the run folder
        in its arguments. Returns once it runs (before exec its command line is still ours)."""
        p = self.spawn(
            [
                "qemu-system-x86_64",
                "-S",
                "-c",
                "import time; print('ready', flush=True); time.sleep(600)",
                f"path={self.run_root}/{box_id}/portal.sock",
            ],
            executable=PYTHON,
            stdout=subprocess.PIPE,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        return p

    def sleeper(self) -> subprocess.Popen[bytes]:
        return self.spawn(["sleep", "600"])

    def dead_owner(self, box_id: str, state: str, **fields: Any) -> None:
        """Claim the box for a short-lived process, which then dies."""
        p = self.sleeper()
        self.store.claim(box_id, p.pid, state=state, **fields)
        p.kill()
        p.wait()

    def recover(self, **kwargs: object) -> recovery.RecoveryReport:
        return recover(self.store, self.paths, run_root=self.run_root, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [path, *path.iterdir()]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_recover_after_owner_is_sigkilled(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    running, starting, stopping = env.box("running"), env.box("starting"), env.box("stopping")
    live, idle = env.box("live"), env.box("idle")
    qemu = env.fake_qemu(running)
    innocent = env.sleeper()  # recorded as a box's QEMU pid, but it is not a QEMU: must survive
    plan = [
        [running, "running", qemu.pid],
        [starting, "starting", innocent.pid],
        [stopping, "stopping", None],
    ]
    owner = env.spawn(
        [PYTHON, "-c", OWNER, str(env.store.path), str(env.run_root), json.dumps(plan)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert owner.stdout is not None and owner.stdout.readline().strip() == b"ready"
    # this test process is the live owner of another box (and of a legacy run folder)
    env.store.claim(live, state="running")
    (env.run_root / live).mkdir()
    (env.run_root / live / "owner").write_text(str(os.getpid()))
    assert env.recover().boxes == []  # the owner is alive: nothing to do

    owner.send_signal(signal.SIGKILL)
    owner.wait()
    caplog.set_level("INFO", logger="hutch.runtime")
    report = env.recover()

    assert {(b.id, b.was, b.now) for b in report.boxes} == {
        (running, "running", "stopped"),
        (starting, "starting", "failed"),
        (stopping, "stopping", "stopped"),
    }
    assert report.killed == [qemu.pid]
    wait_until(lambda: qemu.poll() is not None)
    assert qemu.returncode == -signal.SIGTERM
    assert innocent.poll() is None, "a process that is not QEMU was killed"

    for box_id in (running, starting, stopping):
        rec = env.store.get(box_id)
        assert rec.owner is None and rec.qemu_pid is None and rec.stopped_at is not None
        assert not (env.run_root / box_id).exists()
        assert (env.paths.boxes / box_id / "disk.qcow2").exists()  # disks are kept
        events = env.store.events(box_id)
        assert [e.kind for e in events[-2:]] == ["recovering", "recovered"]
        assert f"owner process {owner.pid} is gone" in events[-1].detail
    assert "killed its QEMU" in env.store.events(running)[-1].detail
    assert "already gone" in env.store.events(starting)[-1].detail
    failed = env.store.get(starting)
    assert failed.state == "failed" and failed.failure and str(owner.pid) in failed.failure
    assert env.store.get(running).failure is None

    # the live owner's box, its run folder, and the unstarted box are untouched
    rec = env.store.get(live)
    assert rec.state == "running" and rec.owner == ProcessIdentity.current()
    assert (env.run_root / live / "owner").exists()
    assert env.store.get(idle).state == "created"
    assert sorted(p.name for p in report.run_dirs) == sorted([running, starting, stopping])
    assert "recovery: 3 box(es) recovered" in caplog.text

    # a second run finds nothing to do
    assert not env.recover()
    assert innocent.poll() is None


def test_reused_pid_is_not_the_owner(env: Env) -> None:
    """The owner's pid is alive, but it is another process now (different start time)."""
    box_id = env.box()
    me = ProcessIdentity.current()
    env.store.update_state(
        box_id, "running", owner_pid=me.pid, owner_start=(me.start or 0) - 3.0, owner_boot=me.boot
    )
    report = env.recover()
    assert [(b.id, b.now) for b in report.boxes] == [(box_id, "stopped")]
    assert "now belongs to another process" in env.store.events(box_id)[-1].detail


def test_an_auto_remove_box_of_a_dead_owner_is_removed(env: Env) -> None:
    kept, ephemeral = env.box(), env.box(auto_remove=True)
    env.dead_owner(kept, "running")
    env.dead_owner(ephemeral, "running")
    report = env.recover()
    assert sorted((b.id, b.now) for b in report.boxes) == sorted(
        [(kept, "stopped"), (ephemeral, "removed")]
    )
    assert env.store.by_id(ephemeral) is None and not (env.paths.boxes / ephemeral).exists()
    assert env.store.get(kept).state == "stopped" and (env.paths.boxes / kept).is_dir()


def test_box_without_owner_and_other_boot(env: Env) -> None:
    no_owner, other_boot = env.box(), env.box()
    with sqlite3.connect(env.store.path) as raw:  # (the store itself refuses this state)
        raw.execute("UPDATE boxes SET state = 'running' WHERE id = ?", (no_owner,))
    me = ProcessIdentity.current()
    # after a reboot even a live pid with the same start time is another process, and the QEMU
    # pid recorded then means nothing now: it is not even looked at
    sleeper = env.sleeper()
    env.store.update_state(
        other_boot,
        "running",
        owner_pid=me.pid,
        owner_start=me.start,
        owner_boot="0" * 32,
        qemu_pid=sleeper.pid,
    )
    report = env.recover()
    assert {b.id for b in report.boxes} == {no_owner, other_boot}
    assert "no owner" in env.store.events(no_owner)[-1].detail
    assert "rebooted" in env.store.events(other_boot)[-1].detail
    assert sleeper.poll() is None


def test_never_kills_what_is_not_this_boxs_qemu(env: Env) -> None:
    box_id, other_id = env.box(), env.box()
    sleeper = env.sleeper()
    other_qemu = env.fake_qemu(other_id)  # a QEMU, but of another box
    assert not is_qemu_of(sleeper.pid, box_id)
    assert not is_qemu_of(os.getpid(), box_id)
    assert not is_qemu_of(other_qemu.pid, box_id)
    assert is_qemu_of(other_qemu.pid, other_id)
    assert not kill_qemu(sleeper.pid, box_id, grace=0.1)
    assert not kill_qemu(other_qemu.pid, box_id, grace=0.1)
    assert not kill_qemu(2**22 + 1, box_id, grace=0.1)  # no such process
    env.dead_owner(box_id, "running", qemu_pid=other_qemu.pid)
    report = env.recover()
    assert [b.id for b in report.boxes] == [box_id] and report.killed == []
    assert sleeper.poll() is None and other_qemu.poll() is None


def test_kill_escalates_to_sigkill(env: Env) -> None:
    box_id = env.box()
    stubborn = env.spawn(
        [
            "qemu-system-x86_64",
            "-S",
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)",
            f"{env.run_root}/{box_id}/qmp.sock",
        ],
        executable=PYTHON,
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == b"ready"
    assert kill_qemu(stubborn.pid, box_id, grace=0.2)
    assert stubborn.wait(5) == -signal.SIGKILL


def test_half_done_recovery_is_finished(env: Env) -> None:
    """A recovering process killed after its takeover leaves the box stopping, owned by a dead
    process: the next recovery completes it."""
    box_id = env.box()
    env.dead_owner(box_id, "stopping", event=("recovering", "it was running"))
    report = env.recover()
    assert [(b.id, b.was, b.now) for b in report.boxes] == [(box_id, "stopping", "stopped")]


def test_a_restarted_box_is_not_hijacked(env: Env) -> None:
    """Recovery acts on a snapshot; if the box was restarted by a live process since, the CAS on
    the revision makes recovery leave it alone."""
    box_id = env.box()
    env.dead_owner(box_id, "running")
    stale = env.store.get(box_id)
    env.store.claim(box_id, state="running", expect={"running"})  # "restarted" by this process
    assert (
        recovery._recover_box(
            env.store, stale, env.run_root, env.paths.boxes, 0.1, recovery.RecoveryReport()
        )
        is None
    )
    rec = env.store.get(box_id)
    assert rec.state == "running" and rec.owner_alive()


def test_orphans_are_reclaimed(env: Env) -> None:
    boxes = env.paths.boxes
    kept_row = env.box("has-a-row")
    orphan_old = boxes / "0000000000000000a1"
    orphan_new = boxes / "0000000000000000a2"
    not_a_box = boxes / "notes"
    held = boxes / "0000000000000000a3"  # no row, but a live process says it is its box
    for d in (orphan_old, orphan_new, not_a_box, held):
        d.mkdir()
        (d / "console.log").write_text("x")
    for d in (orphan_old, not_a_box, held, boxes / kept_row):
        age(d, 120)
    (env.run_root / held.name).mkdir()
    (env.run_root / held.name / "owner").write_text(str(os.getpid()))

    # run folders: one whose owner died, one just being made (no owner file yet), one stray file
    dead = env.sleeper()
    dead.kill()
    dead.wait()
    stale_run = env.run_root / "0000000000000000b1"
    stale_run.mkdir()
    (stale_run / "owner").write_text(str(dead.pid))
    fresh_run = env.run_root / "0000000000000000b2"
    fresh_run.mkdir()
    # an orphan QEMU: its box has no row and its run folder's owner is dead
    orphan_qemu = env.fake_qemu(stale_run.name)

    report = env.recover(startup_grace=5.0)
    assert report.box_dirs == [orphan_old]
    assert not orphan_old.exists()
    assert orphan_new.exists() and not_a_box.exists() and held.exists()
    assert (boxes / kept_row).exists()
    assert report.run_dirs == [stale_run] and fresh_run.exists()
    assert report.killed == []  # the QEMU is younger than startup_grace: maybe starting

    report = env.recover(startup_grace=0.0)
    assert report.killed == [orphan_qemu.pid]
    wait_until(lambda: orphan_qemu.poll() is not None)
    assert report.run_dirs == [fresh_run]  # no owner file after the grace: stale too
    assert held.exists() and (env.run_root / held.name).exists()


RECOVERER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from hutch.paths import HutchPaths
    from hutch.runtime.recovery import recover
    from hutch.runtime.store import BoxStore
    paths = HutchPaths(Path(sys.argv[1]))
    store = BoxStore.for_home(paths)
    print("ready", flush=True)
    sys.stdin.readline()
    report = recover(store, paths, run_root=Path(sys.argv[2]), kill_grace=2.0)
    print(json.dumps({"boxes": [b.id for b in report.boxes], "killed": report.killed}), flush=True)
    """
)


def test_two_processes_recover_at_once(env: Env) -> None:
    ids = [env.box() for _ in range(30)]
    qemus = {}
    for i, box_id in enumerate(ids):
        if i % 3 == 0:
            qemus[box_id] = env.fake_qemu(box_id)
        env.dead_owner(
            box_id,
            "starting" if i % 2 else "running",
            qemu_pid=qemus[box_id].pid if box_id in qemus else None,
        )
    procs = [
        env.spawn(
            [PYTHON, "-c", RECOVERER, str(env.paths.home), str(env.run_root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    recovered = [b for r in results for b in r["boxes"]]
    assert sorted(recovered) == sorted(ids)  # every box once, by one process or the other
    killed = [k for r in results for k in r["killed"]]
    assert sorted(killed) == sorted(q.pid for q in qemus.values())
    for i, box_id in enumerate(ids):
        rec = env.store.get(box_id)
        assert rec.state == ("failed" if i % 2 else "stopped")
        kinds = [e.kind for e in env.store.events(box_id)]
        assert kinds.count("recovered") == 1 and kinds.count("recovering") == 1
    for q in qemus.values():
        wait_until(lambda q=q: q.poll() is not None)  # type: ignore[misc]
