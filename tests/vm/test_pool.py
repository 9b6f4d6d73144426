"""Warm pools with real guests (TCG here): a pooled create hands out a running box at once, with
an identity of its own (hostname, RNG, clock); the pool refills; no box is handed out twice;
options that shape the VM bypass the pool; close() drains everything; a killed owner's pool boxes
are removed by the next runtime's recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import hutch
from hutch.errors import ConflictError, InvalidStateError, NotFoundError
from hutch.runtime.snapshots import snapshots_root
from hutch.runtime.store import BoxRecord
from tests.support.homes import make_home

pytestmark = pytest.mark.vm

SIZE = 2
#: Every box id handed out in this module: none may come out of a pool twice.
HANDED: set[str] = set()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_home(tmp_path_factory.mktemp("pool") / "home")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rt(home: Path) -> AsyncIterator[hutch.Runtime]:
    async with hutch.Runtime(home, pool=[hutch.PoolSpec("busybox", size=SIZE)]) as runtime:
        await runtime.wait_pool(180)
        yield runtime


def pool_rows(rt: hutch.Runtime) -> list[BoxRecord]:
    return [r for r in rt.store.list(include_pool=True) if r.pool is not None]


def qemus_of(home: Path) -> list[int]:
    """Pids of QEMU processes whose command line names something under ``home``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(home).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


async def sh(box: hutch.Box, script: str) -> str:
    r = await box.exec("sh", "-c", script, timeout=30)
    r.assert_success()
    return r.stdout


async def take(rt: hutch.Runtime, **options: object) -> hutch.Box:
    box = await rt.create(image="busybox", **options)
    assert box.state == "running", "not handed out from the pool"
    assert box.id not in HANDED
    HANDED.add(box.id)
    return box


async def test_pooled_create_hands_out_a_running_box(rt: hutch.Runtime) -> None:
    status = (await rt.pool_status())[0]
    assert (status.size, status.ready, status.failures) == (SIZE, SIZE, 0)
    waiting = {r.id for r in pool_rows(rt)}
    assert len(waiting) == SIZE
    assert not waiting & {r.id for r in await rt.list()}  # invisible until handed out
    for box_id in waiting:
        with pytest.raises(NotFoundError):
            await rt.get(box_id)
    await asyncio.sleep(2)  # the pool's boxes have waited a while
    wall0 = time.time()
    t0 = time.monotonic()
    box = await take(rt, name="pooled-a", env={"MODE": "pooled"}, labels={"team": "a"})
    assert time.monotonic() - t0 < 1.0
    assert box.id in waiting and box.qemu_pid is not None
    assert box.snapshot_id == status.snapshot_id
    try:
        out = await sh(box, "hostname; echo $HOSTNAME $MODE; date +%s")
        host, env_line, stamp = out.split("\n")[:3]
        assert host == "pooled-a" and env_line == "pooled-a pooled"
        assert abs(int(stamp) - time.time()) < 3
        rec = await asyncio.to_thread(rt.store.get, "pooled-a")
        assert (rec.id, rec.state, rec.pool) == (box.id, "running", None)
        assert rec.options.env == {"MODE": "pooled"} and rec.options.labels == {"team": "a"}
        assert not rec.options.auto_remove and rec.created_at >= wall0
        assert box.id in {r.id for r in await rt.list()}
        assert (await rt.get("pooled-a")) is box
        assert box.commands == 1  # the pool's warm-up command is not the user's
        status = (await rt.pool_status())[0]
        assert status.handed_out == 1 and status.misses == 0
    finally:
        await box.remove()


async def test_pooled_boxes_have_their_own_identity(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    a = await take(rt, auto_remove=True)
    b = await take(rt, auto_remove=True)
    try:
        seen = []
        for box in (a, b):
            out = await sh(box, "hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
            host, rnd = out.split("\n")[:2]
            assert host == box.name == f"hutch-{box.id[-6:]}"
            assert len(rnd) == 64
            seen.append((host, rnd))
        assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]
        assert a.snapshot_id == b.snapshot_id
    finally:
        await a.remove()
        await b.remove()


async def test_pool_refills_and_never_hands_a_box_out_twice(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    for _ in range(3):
        box = await take(rt, auto_remove=True)
        assert await sh(box, "echo ok") == "ok\n"
        await box.remove()
        await rt.wait_pool(120)  # back to SIZE ready boxes
        status = (await rt.pool_status())[0]
        assert status.ready == SIZE and status.restoring == 0
        waiting = {r.id for r in pool_rows(rt)}
        assert len(waiting) == SIZE and not waiting & HANDED
    assert (await rt.pool_status())[0].failures == 0


async def test_a_taken_name_leaves_the_pool_as_it_was(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    box = await take(rt, name="taken", auto_remove=True)
    try:
        ready = (await rt.pool_status())[0].ready
        with pytest.raises(ConflictError, match="taken"):
            await rt.create(image="busybox", name="taken")
        assert (await rt.pool_status())[0].ready == ready
    finally:
        await box.remove()


async def test_non_matching_options_bypass_the_pool(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    before = (await rt.pool_status())[0]
    for options in (
        {"memory_mib": 384},
        {"disk_size_mib": 1024},
        {"accel": "tcg"},
        {"image": "busybox", "cpus": 2} if (os.cpu_count() or 1) > 1 else {"memory_mib": 192},
        {"pool": False},
    ):
        box = await rt.create(**{"image": "busybox", **options})
        try:
            assert box.state == "created" and box.snapshot_id is None, options
        finally:
            await box.remove()
    after = (await rt.pool_status())[0]
    assert (after.handed_out, after.misses, after.ready) == (before.handed_out, 0, SIZE)


async def test_an_empty_pool_restores_its_snapshot_instead(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    boxes = [await take(rt, auto_remove=True) for _ in range(SIZE)]
    late = await rt.create(image="busybox", name="late", auto_remove=True)
    try:
        status = (await rt.pool_status())[0]
        assert status.misses == 1
        assert late.state == "created" and late.snapshot_id == status.snapshot_id
        await late.start()  # restores the pool's snapshot (no boot)
        assert late.hello is not None and late.hello.nonce is not None
        assert await sh(late, "hostname") == "late\n"
    finally:
        for box in [*boxes, late]:
            await box.remove()


async def test_a_box_that_dies_while_waiting_is_never_handed_out(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    dead = pool_rows(rt)[0]
    assert dead.qemu_pid
    os.kill(dead.qemu_pid, signal.SIGKILL)
    await asyncio.sleep(0.5)  # its watcher sees QEMU exit
    box = await take(rt, auto_remove=True)
    try:
        assert box.id != dead.id
        assert await sh(box, "echo alive") == "alive\n"
    finally:
        await box.remove()
    await rt.wait_pool(120)
    deadline = time.monotonic() + 10
    while dead.id in {r.id for r in pool_rows(rt)} and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert dead.id not in {r.id for r in rt.store.list(include_pool=True)}
    assert not (rt.paths.boxes / dead.id).exists()


async def test_resize(rt: hutch.Runtime) -> None:
    await rt.wait_pool(120)
    status = await rt.configure_pool("busybox", size=1)
    assert (status.size, status.ready) == (1, 1)
    await asyncio.sleep(1)
    assert len(pool_rows(rt)) == 1  # the surplus box was removed
    await rt.configure_pool("busybox:latest", size=SIZE)
    await rt.wait_pool(120)
    assert len(pool_rows(rt)) == SIZE


async def test_close_drains_everything(tmp_path: Path) -> None:
    home = make_home(tmp_path / "drain")
    rt = hutch.Runtime(home, pool=[hutch.PoolSpec("busybox", size=SIZE)])
    await rt.wait_pool(180)
    gone = await take(rt, auto_remove=True)
    kept = await take(rt, name="keeper")
    await rt.wait_pool(120)
    pids = [r.qemu_pid for r in pool_rows(rt)] + [gone.qemu_pid, kept.qemu_pid]
    assert all(pids) and len(pids) == SIZE + 2
    snap_id = (await rt.pool_status())[0].snapshot_id
    assert snap_id is not None
    await rt.close()
    assert not [p for p in pids if p is not None and os.path.exists(f"/proc/{p}")]
    assert qemus_of(home) == []
    rows = rt.store.list(include_pool=True)
    assert [(r.name, r.state) for r in rows] == [("keeper", "stopped")]
    assert sorted(os.listdir(home / "boxes")) == [kept.id]
    # the snapshot stays for the box handed out from it (its disk builds on it), no longer held
    snap = await rt.get_snapshot(snap_id)
    assert snap.auto_remove and snap.holder_pid is None
    async with hutch.Runtime(home) as again:
        await again.remove("keeper")
        assert await again.snapshots() == []
    assert list(snapshots_root(rt.paths).iterdir()) == []


async def test_a_create_racing_close_leaves_nothing_running(tmp_path: Path) -> None:
    """close() while a create() is handing out a pooled box: the box is not left running
    without an owner — create() either returned it before close() stopped it, or it removed
    the box and raised InvalidStateError."""
    home = make_home(tmp_path / "race")
    rt = hutch.Runtime(home, pool=[hutch.PoolSpec("busybox", size=1)])
    await rt.wait_pool(180)
    created, closed = await asyncio.gather(
        rt.create(image="busybox"), rt.close(), return_exceptions=True
    )
    assert closed is None
    if isinstance(created, BaseException):
        assert isinstance(created, InvalidStateError), created
    else:
        assert created.state in ("stopped", "removed")
    assert qemus_of(home) == []
    assert [r.state for r in rt.store.list(include_pool=True)] in ([], ["stopped"])


async def test_a_pool_from_config_drained_by_size_0(tmp_path: Path) -> None:
    config = '[pool]\nmax_restores = 2\n[[pool.boxes]]\nimage = "busybox"\nsize = 1\n'
    home = make_home(tmp_path / "untouched", extra_config=config)
    async with hutch.Runtime(home, pool=True) as rt:
        (status,) = await rt.pool_status()
        assert (status.image, status.size, rt._max_restores) == ("busybox", 1, 2)
        await rt.wait_pool(180)
        assert len(pool_rows(rt)) == 1 and len(await rt.snapshots()) == 1
        assert (await rt.configure_pool("busybox", size=0)).size == 0
        assert await rt.pool_status() == []
        assert pool_rows(rt) == [] and await rt.snapshots() == []
        assert qemus_of(home) == []
    assert os.listdir(home / "boxes") == [] and list(snapshots_root(rt.paths).iterdir()) == []


async def test_a_killed_owners_pool_boxes_are_removed_by_recovery(tmp_path: Path) -> None:
    home = make_home(tmp_path / "crash")
    body = f"""
        async with hutch.Runtime({str(home)!r}, pool=[hutch.PoolSpec("busybox", size=2)]) as rt:
            await rt.wait_pool(180)
            kept = await rt.create(image="busybox", name="kept")
            await rt.wait_pool(180)
            rows = [r for r in rt.store.list(include_pool=True) if r.pool]
            print(json.dumps({{
                "pool": [r.id for r in rows],
                "pids": [r.qemu_pid for r in rows] + [kept.qemu_pid],
                "kept": kept.id,
            }}), flush=True)
            await asyncio.sleep(3600)
    """
    script = "import asyncio, json, hutch\nasync def main():\n"
    script += textwrap.indent(textwrap.dedent(body), " " * 4)
    script += "\nasyncio.run(main())\n"
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 240)
        assert line, p.stderr.read() if p.stderr else ""
        seen = json.loads(line)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while qemus_of(home) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert qemus_of(home) == []  # --pdeathsig
    assert len(seen["pids"]) == 3 and all(seen["pids"])
    async with hutch.Runtime(home) as other:
        report = other.last_recovery
        assert report is not None
        assert {b.id: b.now for b in report.boxes} == {
            **dict.fromkeys(seen["pool"], "removed"),
            seen["kept"]: "stopped",
        }
        rows = other.store.list(include_pool=True)
        assert [(r.id, r.state, r.pool) for r in rows] == [(seen["kept"], "stopped", None)]
        assert sorted(os.listdir(home / "boxes")) == [seen["kept"]]
        # its snapshot: kept for the box handed out from it, held by nobody alive; removed with it
        (snap,) = await other.snapshots()
        assert snap.pool is not None and snap.holder_pid == p.pid
        await other.remove("kept")
        assert await other.snapshots() == []
    assert list(snapshots_root(hutch.Runtime(home).paths).iterdir()) == []
