"""One test suite, two runtimes: the runtime API's behaviour, asserted the same way for the embedded
``hutch.Runtime`` and for ``hutch.connect()`` to a real ``hutch serve`` (see conftest.py).

Boots per runtime: the shared box (1) and its restart (1), and ``run()`` (1); restores: four
boxes made from snapshots of the shared box."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import hutch
from hutch.runtime.metrics import BoxMetrics, RuntimeMetrics
from tests.parity.conftest import SHARED, SHARED_ENV

pytestmark = [pytest.mark.vm, pytest.mark.server]


def names(records: list[hutch.BoxRecord]) -> list[str]:
    """Names of our boxes (the remote home is shared with other server tests)."""
    return [r.name for r in records if r.name and r.name.startswith("parity-")]


# --- boxes, no boot -------------------------------------------------------------------------
async def test_create_get_list_remove(any_runtime: Any) -> None:
    rt = any_runtime
    box = await rt.create(image="busybox", name="parity-a", env={"K": "V"}, labels={"t": "1"})
    try:
        assert (box.name, box.state, box.image) == ("parity-a", "created", "busybox")
        assert box.options.env == {"K": "V"} and box.options.labels == {"t": "1"}
        with pytest.raises(hutch.ConflictError, match="parity-a"):
            await rt.create(image="busybox", name="parity-a")
        for key in (box.id, "parity-a", box.id[:8]):  # id, name, unique id prefix
            got = await rt.get(key)
            assert (got.id, got.name, got.state) == (box.id, "parity-a", "created")
        with pytest.raises(hutch.NotFoundError, match="parity-nothing"):
            await rt.get("parity-nothing")
        [rec] = [r for r in await rt.list() if r.name == "parity-a"]
        assert isinstance(rec, hutch.BoxRecord)
        assert (rec.id, rec.state, rec.image, rec.owner_pid) == (box.id, "created", "busybox", None)
        assert "parity-a" in names(await rt.list(state="created"))
        assert "parity-a" in names(await rt.list(state=["created", "stopped"]))
        assert "parity-a" not in names(await rt.list(state="running"))
        with pytest.raises(hutch.BadRequestError, match="state"):
            await rt.list(state="sleeping")
    finally:
        await rt.remove("parity-a")
    with pytest.raises(hutch.NotFoundError, match="parity-a"):
        await rt.get("parity-a")
    with pytest.raises(hutch.NotFoundError):
        await rt.remove(box.id)
    assert "parity-a" not in names(await rt.list())


async def test_option_rules_are_the_same(any_runtime: Any) -> None:
    with pytest.raises(hutch.ConfigError, match="memory_mib"):
        await any_runtime.create(image="busybox", memory_mib=1)
    with pytest.raises(hutch.ConfigError, match="name"):
        await any_runtime.create(image="busybox", name="Bad Name")
    assert "parity-" not in "".join(names(await any_runtime.list()))  # nothing was made


# --- the shared running box -----------------------------------------------------------------
async def test_a_stopped_box_keeps_its_files(any_runtime: Any, shared_box: Any) -> None:
    rt, box = any_runtime, shared_box
    assert box.state == "running"
    assert SHARED in names(await rt.list(state="running"))
    (await box.exec("sh", "-c", "echo kept > /root/note && sync")).assert_success()
    with pytest.raises(hutch.InvalidStateError, match="force"):
        await rt.remove(SHARED)  # a running box needs force
    await box.stop()
    assert box.state == "stopped"
    assert (await rt.get(SHARED)).state == "stopped"
    assert SHARED in names(await rt.list(state="stopped"))
    with pytest.raises(hutch.InvalidStateError, match="not running"):
        await box.exec("true")
    await box.start()
    assert box.state == "running"
    r = await box.exec("cat", "/root/note")
    assert (r.exit_code, r.stdout) == (0, "kept\n")


async def test_exec_output_env_cwd_user_stdin(shared_box: Any) -> None:
    box = shared_box
    r = await box.exec("sh", "-c", "echo out; echo err >&2; exit 3")
    assert isinstance(r, hutch.ExecResult)
    assert (r.exit_code, r.stdout, r.stderr, r.signal, r.timed_out) == (
        3,
        "out\n",
        "err\n",
        None,
        False,
    )
    assert r.command == ["sh", "-c", "echo out; echo err >&2; exit 3"] and r.pid
    with pytest.raises(hutch.ExecutionError) as failed:
        r.assert_success()
    assert failed.value.exit_code == 3
    # the box's env under the command's
    r = await box.exec("sh", "-c", "echo $FROM_BOX $BOTH $MINE", env={"BOTH": "exec", "MINE": "m"})
    assert r.stdout == f"{SHARED_ENV['FROM_BOX']} exec m\n"
    r = await box.exec(["sh", "-c", "pwd; id -u"], cwd="/tmp", user="hutch")
    assert r.stdout == "/tmp\n1000\n"
    data = bytes(range(256)) * 300
    assert (await box.exec("cat", stdin=data)).stdout_bytes == data
    assert (await box.exec("sh", "-c", "read x; echo got $x", stdin="it\n")).stdout == "got it\n"
    assert (await box.exec("cat")).stdout == ""  # no stdin: /dev/null


async def test_exec_errors(shared_box: Any) -> None:
    box = shared_box
    with pytest.raises(hutch.TimeoutError, match="timeout"):
        await box.exec("sleep", "10", timeout=0.5)
    with pytest.raises(hutch.NotFoundError):
        await box.exec("/no/such/program")
    with pytest.raises(hutch.OutputLimitError):
        await box.exec("head", "-c", "5000", "/dev/zero", max_output_bytes=1000)
    with pytest.raises(hutch.BadRequestError):
        await box.exec("true", env={"A=B": "x"})
    assert (await box.exec("echo", "still fine")).stdout == "still fine\n"


async def test_spawn_streams_stdin_and_output(shared_box: Any) -> None:
    box = shared_box
    proc = await box.spawn("cat")
    assert proc.pid > 0
    await proc.stdin.write(b"ping\n")
    assert await proc.stdout.read_chunk() == b"ping\n"
    data = bytes(range(256)) * 8192  # 2 MiB: beyond the remote flow-control window
    writer = asyncio.create_task(_write_and_close(proc, data))
    assert await proc.stdout.read() == data
    await writer
    result = await proc.wait()
    assert isinstance(result, hutch.ExecResult) and result.exit_code == 0
    # no stdin, both streams, and wait() collecting what was not read
    proc = await box.spawn("sh", "-c", "echo a; echo b >&2; exit 4", stdin=False)
    result = await proc.wait()
    assert (result.exit_code, result.stdout, result.stderr) == (4, "a\n", "b\n")
    proc = await box.spawn("sleep", "1000")
    await proc.kill()
    result = await proc.wait(timeout=20)
    assert (result.exit_code, result.signal) == (None, 9)


async def _write_and_close(proc: Any, data: bytes) -> None:
    await proc.stdin.write(data)
    await proc.stdin.close()


async def test_metrics(any_runtime: Any, shared_box: Any) -> None:
    await shared_box.exec("true")
    m = await shared_box.metrics()
    assert isinstance(m, BoxMetrics)
    assert m.commands >= 1 and m.errors >= 0
    assert m.total_create_ms and m.guest_boot_ms and 0 < m.guest_boot_ms < m.total_create_ms
    assert 0 < m.memory_bytes < m.memory_total_bytes and m.qemu_rss_bytes > 0
    assert m.cpu_percent >= 0
    rm = await any_runtime.metrics()
    assert isinstance(rm, RuntimeMetrics)
    assert rm.boxes_created >= 1 and rm.running >= 1
    assert rm.commands >= m.commands and rm.errors >= m.errors


# --- snapshots, clones and forks -------------------------------------------------------------
async def test_snapshot_clone_fork_and_remove(any_runtime: Any, shared_box: Any) -> None:
    rt, box = any_runtime, shared_box
    (await box.exec("sh", "-c", "echo frozen > /root/snapped && sync")).assert_success()
    snap = await box.snapshot(name="parity-snap")
    made: list[Any] = []
    try:
        assert isinstance(snap, hutch.Snapshot)
        assert (snap.name, snap.source_box, snap.image, snap.auto_remove) == (
            "parity-snap",
            box.id,
            "busybox",
            False,
        )
        assert (snap.cpus, snap.memory_mib) == (box.options.cpus, box.options.memory_mib)
        assert snap.options.env == SHARED_ENV and snap.options.name is None
        assert snap.ram_bytes > 0 and snap.disk_bytes > 0 and snap.size_bytes > snap.ram_bytes
        assert await rt.get_snapshot("parity-snap") == snap
        assert (await rt.get_snapshot(snap.id[:8])).id == snap.id  # a unique id prefix
        assert snap.id in [s.id for s in await rt.snapshots()]
        assert await rt.snapshot_users("parity-snap") == []
        with pytest.raises(hutch.ConflictError, match="parity-snap"):
            await box.snapshot(name="parity-snap")
        with pytest.raises(hutch.NotFoundError, match="parity-no-snap"):
            await rt.get_snapshot("parity-no-snap")
        with pytest.raises(hutch.ConfigError, match="memory_mib"):  # the machine is the snapshot's
            await rt.create(snapshot="parity-snap", memory_mib=box.options.memory_mib * 2)
        opts = hutch.BoxOptions(image="busybox", name="parity-opts", labels={"via": "options"})
        o = await rt.create(opts, snapshot="parity-snap")  # options: the per-box fields count
        assert (o.name, o.options.labels, o.options.env) == ("parity-opts", {"via": "options"}, {})
        await rt.remove(o.id)
        (await box.exec("sh", "-c", "echo later > /root/later && sync")).assert_success()

        # a box made from the snapshot resumes it, under its own name
        a = await rt.create(snapshot=snap, name="parity-from-snap", env={"ONLY": "a"})
        made.append(a)
        assert (a.state, a.image, a.options.env) == ("created", "busybox", {"ONLY": "a"})
        assert await rt.snapshot_users("parity-snap") == [a.id]
        await a.start()
        assert a.state == "running"
        r = await a.exec("sh", "-c", "cat /root/snapped; hostname; test -e /root/later || echo no")
        assert r.stdout == "frozen\nparity-from-snap\nno\n"
        with pytest.raises(hutch.ConflictError, match="used by"):
            await rt.remove_snapshot("parity-snap")

        # clone() and fork(): snapshot + restore; the box runs on meanwhile
        b = await box.clone(name="parity-clone")
        made.append(b)
        assert (b.name, b.state) == ("parity-clone", "running")
        c, d = await box.fork(2, names=["parity-fork-1", "parity-fork-2"])
        made += [c, d]
        for clone in (b, c, d):
            r = await clone.exec("sh", "-c", "cat /root/snapped /root/later; hostname")
            assert r.stdout == f"frozen\nlater\n{clone.name}\n"
        assert box.state == "running" and (await box.exec("true")).exit_code == 0
        with pytest.raises(hutch.BadRequestError):
            await box.fork(2, names=["parity-same", "parity-same"])
        running = names(await rt.list(state="running"))
        assert {"parity-from-snap", "parity-clone", "parity-fork-1", "parity-fork-2"} <= set(
            running
        )
    finally:
        for m in made:
            await rt.remove(m.id, force=True)
    # no clone left: the named snapshot can go; the clone()/fork() ones went with their clones
    await rt.remove_snapshot("parity-snap")
    with pytest.raises(hutch.NotFoundError):
        await rt.get_snapshot(snap.id)
    assert [s.id for s in await rt.snapshots() if s.source_box == box.id] == []


# --- ephemeral ------------------------------------------------------------------------------
async def test_run_is_ephemeral(any_runtime: Any) -> None:
    before = {r.id for r in await any_runtime.list()}
    r = await any_runtime.run("busybox", "sh", "-c", "echo $X", env={"X": "ran"})
    assert isinstance(r, hutch.ExecResult) and (r.exit_code, r.stdout) == (0, "ran\n")
    assert {r.id for r in await any_runtime.list()} == before


# --- warm pools -----------------------------------------------------------------------------
async def test_warm_pool(any_runtime: Any) -> None:
    """configure_pool / pool_status / wait_pool / a pooled create, the same on both runtimes.
    An odd memory size keeps the pool's machine apart from every other test's busybox boxes (the
    remote home is shared: their creates must not come out of this pool)."""
    rt = any_runtime
    mem = 200
    try:
        status = await rt.configure_pool("busybox", memory_mib=mem, size=1)
        assert isinstance(status, hutch.PoolStatus)
        assert (status.cpus, status.memory_mib, status.size) == (1, mem, 1)
        assert status.image == "busybox"
        with pytest.raises(hutch.ConfigError, match="size"):
            await rt.configure_pool("busybox", memory_mib=mem, size=-1)
        await rt.wait_pool(180)
        [p] = [p for p in await rt.pool_status() if p.memory_mib == mem]
        assert (p.size, p.ready) == (1, 1) and p.snapshot_id
        box = await rt.create(image="busybox", memory_mib=mem, name="parity-pooled")
        try:
            assert box.state == "running"  # handed out already running
            r = await box.exec("hostname")
            assert r.stdout == "parity-pooled\n"
        finally:
            await rt.remove(box.id, force=True)
        [p] = [p for p in await rt.pool_status() if p.memory_mib == mem]
        assert p.handed_out == 1
    finally:
        gone = await rt.configure_pool("busybox", memory_mib=mem, size=0)
        assert gone.size == 0
    assert [p for p in await rt.pool_status() if p.memory_mib == mem] == []
