"""Snapshots, restores and clones of real guests (TCG here): what is frozen, what each clone gets
of its own (files, RNG, clock, hostname), the records, and the source box running on."""

from __future__ import annotations

import asyncio
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
from hutch.errors import BadRequestError, ConfigError, ConflictError, NotFoundError
from hutch.paths import HutchPaths
from hutch.runtime.snapshots import RAM_FILE, Snapshot, snapshots_root
from tests.support.homes import make_home

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_home(tmp_path_factory.mktemp("snap") / "home")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rt(home: Path) -> AsyncIterator[hutch.Runtime]:
    async with hutch.Runtime(home) as runtime:
        yield runtime


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def source(rt: hutch.Runtime) -> AsyncIterator[hutch.Box]:
    box = await rt.create(image="busybox", name="source", memory_mib=256)
    await box.start()
    (await box.exec("sh", "-c", "echo before > /root/before")).assert_success()
    yield box
    await box.remove()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base(rt: hutch.Runtime, source: hutch.Box) -> Snapshot:
    """A named snapshot of the source, taken once; restored by most tests."""
    return await source.snapshot(name="base")


async def sh(box: hutch.Box, script: str) -> str:
    r = await box.exec("sh", "-c", script, timeout=30)
    r.assert_success()
    return r.stdout


async def test_snapshot_record_and_files(
    rt: hutch.Runtime, source: hutch.Box, base: Snapshot
) -> None:
    assert (base.name, base.source_box, base.image, base.auto_remove) == (
        "base",
        source.id,
        "busybox",
        False,
    )
    assert (base.cpus, base.memory_mib, base.accel) == (1, 256, source.accel)
    folder = base.folder(rt.paths)
    assert folder.parent == snapshots_root(rt.paths)
    ram = (folder / RAM_FILE).stat()
    assert ram.st_size == 256 << 20  # the guest's whole RAM, but sparse:
    assert 1 << 20 < base.ram_bytes == ram.st_blocks * 512 < 128 << 20
    assert 0 < base.state_bytes < 1 << 20 and base.disk_bytes > 0
    assert [s.id for s in await rt.snapshots()] == [base.id]
    assert (await rt.get_snapshot("base")) == base
    with pytest.raises(ConflictError, match="already taken"):
        await source.snapshot(name="base")
    with pytest.raises(ConfigError):
        await source.snapshot(name="Not A Name")


async def test_source_keeps_running_and_working(source: hutch.Box) -> None:
    # a process running across a snapshot finishes normally, with all its output
    ex = await source.spawn("sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done")
    snap = await source.snapshot()
    r = await ex.wait()
    assert (r.stdout, r.exit_code) == ("1\n2\n3\n4\n5\n", 0)
    assert await sh(source, "cat /root/before; echo new > /root/after; cat /root/after") == (
        "before\nnew\n"
    )
    # the pause does not leave the source's clock behind (THAW sets it)
    assert abs(int(await sh(source, "date +%s")) - time.time()) < 3
    assert source.state == "running"
    rt_snaps = [s.id for s in await hutch.Runtime(source.paths.home).snapshots()]
    assert snap.id in rt_snaps


async def test_clone_sees_the_snapshot_and_writes_its_own(
    rt: hutch.Runtime, source: hutch.Box, base: Snapshot
) -> None:
    a = await rt.create(snapshot="base", name="clone-a")
    b = await rt.create(snapshot=base)
    t0 = time.monotonic()
    await asyncio.gather(a.start(), b.start())
    assert time.monotonic() - t0 < 20
    assert a.restore_ms is not None and a.snapshot_id == base.id
    for c in (a, b):
        assert await sh(c, "cat /root/before") == "before\n"
        assert c.hello is not None and c.hello.nonce is not None
    await sh(a, "echo mine > /root/clone-file; sync")
    assert await sh(a, "cat /root/clone-file") == "mine\n"
    for other in (source, b):
        r = await other.exec("cat", "/root/clone-file")
        assert r.exit_code != 0
    # the source's later writes are not in clones either (the snapshot was taken before)
    await sh(source, "echo later > /root/source-later")
    assert (await a.exec("cat", "/root/source-later")).exit_code != 0
    assert (await rt.snapshot_users("base")) == sorted([a.id, b.id])
    # a snapshot used by boxes cannot be removed
    with pytest.raises(ConflictError, match="used by boxes"):
        await rt.remove_snapshot("base")
    # a stopped clone boots its own disk (the snapshot's disk below it) like any box
    await a.stop()
    await a.start()
    assert a.hello is not None and a.hello.nonce is None  # booted, not restored
    assert await sh(a, "cat /root/clone-file /root/before") == "mine\nbefore\n"
    await a.remove()
    await b.remove()
    assert await rt.snapshot_users("base") == []
    assert (await rt.get_snapshot("base")).id == base.id  # named: kept without clones


async def test_clones_have_their_own_identity(rt: hutch.Runtime, base: Snapshot) -> None:
    await asyncio.sleep(3)  # the snapshot is older than the clones by this much at least
    clones = [await rt.create(snapshot=base, auto_remove=True) for _ in range(2)]
    await asyncio.gather(*(c.start() for c in clones))
    try:
        seen = []
        for c in clones:
            out = await sh(
                c,
                "hostname; echo $HOSTNAME; date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            )
            host, env_host, stamp, rnd = out.split("\n")[:4]
            assert host == env_host == c.name
            assert abs(int(stamp) - time.time()) < 3, (stamp, time.time())
            seen.append((host, rnd))
        assert seen[0][0] != seen[1][0]
        assert seen[0][1] != seen[1][1] and len(seen[0][1]) == 64
    finally:
        for c in clones:
            await c.remove()


async def test_box_clone_and_fork(rt: hutch.Runtime, source: hutch.Box) -> None:
    before = {s.id for s in await rt.snapshots()}
    one = await source.clone(name="cloned")
    assert one.state == "running" and one.name == "cloned"
    assert await sh(one, "hostname") == "cloned\n"
    implicit = await rt.get_snapshot(one.snapshot_id or "")
    assert implicit.auto_remove and implicit.id not in before
    forks = await source.fork(3)
    assert len({f.name for f in forks}) == 3
    outs = await asyncio.gather(*(sh(f, "cat /root/after; hostname") for f in forks))
    assert [o.split("\n")[1] for o in outs] == [f.name for f in forks]
    assert len({f.snapshot_id for f in forks}) == 1
    fork_snap = forks[0].snapshot_id
    # the implicit snapshot goes with its last clone
    await one.remove()
    assert one.snapshot_id not in {s.id for s in await rt.snapshots()}
    assert not (snapshots_root(rt.paths) / implicit.id).exists()
    for f in forks[:2]:
        await f.remove()
    assert fork_snap in {s.id for s in await rt.snapshots()}
    await rt.remove(forks[2].id, force=True)
    assert fork_snap not in {s.id for s in await rt.snapshots()}
    with pytest.raises(BadRequestError):
        await source.fork(0)
    with pytest.raises(BadRequestError):
        await source.fork(2, names=["same", "same"])


async def test_snapshots_survive_a_new_runtime_and_are_removed(
    home: Path, source: hutch.Box, base: Snapshot
) -> None:
    snap = await source.snapshot(name="keep")
    async with hutch.Runtime(home) as other:
        got = await other.get_snapshot("keep")
        assert got == snap
        box = await other.create(snapshot="keep", auto_remove=True)
        await box.start()
        assert await sh(box, "cat /root/after") == "new\n"
        await box.remove()
        await other.remove_snapshot("keep")
        with pytest.raises(NotFoundError):
            await other.get_snapshot("keep")
    assert not (snapshots_root(HutchPaths(home)) / snap.id).exists()
    with pytest.raises(NotFoundError):
        await hutch.Runtime(home).create(snapshot="keep")


async def test_snapshot_of_a_clone_does_not_depend_on_its_parent(
    rt: hutch.Runtime, source: hutch.Box
) -> None:
    gen1 = await source.snapshot()
    child = await rt.create(snapshot=gen1, auto_remove=True)
    await child.start()
    await sh(child, "echo two > /root/gen2")
    gen2 = await child.snapshot(name="gen2")
    # a clone's RAM is a private mapping: it travels in the state file
    assert gen2.state_bytes > 1 << 20
    await child.remove()
    await rt.remove_snapshot(gen1.id)  # nothing uses it now; gen2 has its own disk and RAM
    assert not gen1.folder(rt.paths).exists()
    grandchild = await rt.create(snapshot="gen2", auto_remove=True)
    try:
        await grandchild.start()
        assert await sh(grandchild, "cat /root/before /root/gen2; hostname") == (
            f"before\ntwo\n{grandchild.name}\n"
        )
    finally:
        await grandchild.remove()
        await rt.remove_snapshot("gen2")


async def test_restored_qemus_die_with_their_owner(home: Path) -> None:
    """A killed owner's clones die with it (setpriv --pdeathsig, as booted boxes); the next
    runtime marks them stopped and the snapshot they came from stays consistent."""
    body = """
        src = await rt.create(image="busybox", name="k-src")
        await src.start()
        await src.snapshot(name="k")
        await src.stop()
        clone = await rt.create(snapshot="k", name="k-clone")
        await clone.start()
        print(clone.id, clone.qemu_pid, flush=True)
        await asyncio.sleep(3600)
    """
    script = "import asyncio, hutch\nasync def main():\n"
    script += f"    async with hutch.Runtime({str(home)!r}) as rt:\n"
    script += textwrap.indent(textwrap.dedent(body), " " * 8)
    script += "\nasyncio.run(main())\n"
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 120)
        clone_id, qemu_pid = line.split()
        assert os.path.exists(f"/proc/{qemu_pid}")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu_pid}") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu_pid}")
    async with hutch.Runtime(home) as other:
        clone = await other.get("k-clone")
        assert clone.state == "stopped" and clone.id == clone_id and clone.snapshot_id
        with pytest.raises(ConflictError):
            await other.remove_snapshot("k")
        await clone.start()  # boots its own disk now
        assert await sh(clone, "cat /root/before 2>/dev/null; hostname") == "k-clone\n"
        await other.remove("k-clone", force=True)
        await other.remove("k-src", force=True)
        await other.remove_snapshot("k")


async def test_create_from_snapshot_refuses_another_machine(
    rt: hutch.Runtime, base: Snapshot
) -> None:
    with pytest.raises(ConfigError, match="memory_mib must be the snapshot's"):
        await rt.create(snapshot=base, memory_mib=512)
    c = await rt.create(snapshot=base, env={"MODE": "clone"}, auto_remove=True)
    try:
        await c.start()
        assert await sh(c, "echo $MODE") == "clone\n"
    finally:
        await c.remove()


async def test_failed_restore_is_reported_and_retried(rt: hutch.Runtime, base: Snapshot) -> None:
    """A damaged state file makes the restore fail with QEMU's reason, not hang; the box can be
    started again once the snapshot is whole."""
    state = base.folder(rt.paths) / "state"
    good = state.read_bytes()
    state.chmod(0o644)
    state.write_bytes(good[: len(good) // 2])
    c = await rt.create(snapshot=base, auto_remove=True, boot_timeout=20)
    try:
        t0 = time.monotonic()
        with pytest.raises(hutch.HutchError, match="restor"):
            await c.start()
        assert time.monotonic() - t0 < 15
        assert c.state == "failed" and not (c.box_dir / "disk.qcow2").exists()
        state.write_bytes(good)
        await c.start()
        assert await sh(c, "cat /root/before") == "before\n"
    finally:
        state.write_bytes(good)
        state.chmod(0o444)
        await c.remove()


async def test_remove_named_snapshot_at_the_end(rt: hutch.Runtime, base: Snapshot) -> None:
    await rt.remove_snapshot("base")
    assert "base" not in {s.name for s in await rt.snapshots()}
    assert not base.folder(rt.paths).exists()
