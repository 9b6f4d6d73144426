"""Warm pools, the parts without VMs: which options a pool serves (key matching, the options
split), pool specs and the ``[pool]`` config table, backoff, the store's pool rows and held
snapshots, crash recovery of pool leftovers, and a second RESTORE on a live portal (the real agent
in its host test mode)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import hutch
from hutch.config import PoolConfig
from hutch.errors import ConfigError, ConflictError, InvalidStateError, NotFoundError, PortalError
from hutch.execution import Execution
from hutch.paths import HutchPaths
from hutch.portal import Identity, PortalChannel, SpawnRequest
from hutch.runtime.options import BoxOptions, Port
from hutch.runtime.pool import (
    BACKOFF_MAX,
    PER_BOX_FIELDS,
    PoolKey,
    PoolSpec,
    backoff,
    bypass_reason,
    normalize_image,
    split_options,
)
from hutch.runtime.recovery import recover
from hutch.runtime.snapshots import Snapshot, snapshots_root
from hutch.runtime.store import BoxRecord, BoxStore, ProcessIdentity, _schema_1, _schema_2

POOL = "docker.io/library/busybox:latest cpus=1 memory_mib=256"


# --- which options a pool serves -------------------------------------------------------------
def test_key_matches_every_spelling_of_an_image() -> None:
    a = PoolKey.of(BoxOptions(image="busybox"))
    assert a == PoolKey.of(BoxOptions(image="busybox:latest"))
    assert a == PoolKey.of(BoxOptions(image="docker.io/library/busybox"))
    assert a == PoolSpec("busybox").key
    assert str(a) == POOL
    assert a != PoolKey.of(BoxOptions(image="busybox:1.36"))
    assert a != PoolKey.of(BoxOptions(image="busybox", memory_mib=512))
    assert a != PoolKey.of(BoxOptions(image="busybox", accel="tcg"))
    assert str(PoolKey.of(BoxOptions(accel="tcg"))).endswith(" accel=tcg")
    assert normalize_image("localhost:5000/a/b") == "localhost:5000/a/b:latest"
    assert normalize_image("Not An Image") == "Not An Image"  # compared as given


def test_options_split_into_machine_and_per_box() -> None:
    opts = BoxOptions(image="busybox", name="a", env={"A": "1"}, workdir="/tmp", labels={"k": "v"})
    machine, per_box = split_options(opts)
    assert set(per_box) == PER_BOX_FIELDS
    assert not set(machine) & set(per_box)
    assert set(machine) | set(per_box) == {f.name for f in dataclasses.fields(BoxOptions)}
    assert per_box["env"] == {"A": "1"} and per_box["name"] == "a"
    assert {"image", "cpus", "memory_mib", "disk_size_mib", "ports", "volumes", "accel"} <= set(
        machine
    )


def test_per_box_options_keep_the_pool_and_machine_options_bypass_it() -> None:
    template = PoolSpec("busybox").options()
    same = BoxOptions(
        image="busybox:latest",
        name="mine",
        env={"MODE": "x"},
        workdir="/root",
        user="hutch",
        labels={"team": "a"},
        auto_remove=False,
        boot_timeout=5,
    )
    assert bypass_reason(same, template) is None
    assert bypass_reason(BoxOptions(image="busybox"), template) is None
    cases = {
        "image": BoxOptions(image="debian-python"),
        "memory_mib": BoxOptions(memory_mib=512),
        "disk_size_mib": BoxOptions(disk_size_mib=1024),
        "ports": BoxOptions(ports=[Port.parse("8080:80")]),
        "accel": BoxOptions(accel="tcg"),
    }
    for field, opts in cases.items():
        assert bypass_reason(opts, template) == field


def test_pool_spec_is_validated() -> None:
    spec = PoolSpec("busybox", size=2)
    assert (spec.cpus, spec.memory_mib, spec.accel) == (1, 256, "auto")
    assert spec.options().auto_remove and spec.options().name is None
    with pytest.raises(ConfigError, match="pool size"):
        PoolSpec(size=-1)
    with pytest.raises(ConfigError, match="pool size"):
        PoolSpec(size=65)
    with pytest.raises(ConfigError, match="memory_mib"):
        PoolSpec(memory_mib=1)
    with pytest.raises(ConfigError, match="accel"):
        PoolSpec(accel="hvf")
    assert PoolSpec.from_mapping({"image": "busybox", "size": 3}) == PoolSpec(size=3)
    with pytest.raises(ConfigError, match=r"p\[0\]: unknown key\(s\) colour"):
        PoolSpec.from_mapping({"image": "busybox", "colour": 1}, "p[0]")
    with pytest.raises(ConfigError, match="image is required"):
        PoolSpec.from_mapping({"size": 1})


def test_backoff_doubles_and_is_capped() -> None:
    first = [backoff(1) for _ in range(50)]
    assert all(0.39 < d < 0.61 for d in first)
    assert 0.79 < backoff(2) < 1.21
    assert all(backoff(n) <= BACKOFF_MAX * 1.2 for n in (10, 100, 10_000))


def test_pool_config_table(tmp_path: Path) -> None:
    paths = HutchPaths(tmp_path)

    def load(text: str) -> PoolConfig:
        (tmp_path / "config.toml").write_text(text)
        return PoolConfig.load(paths)

    assert load("") == PoolConfig()
    got = load(
        '[pool]\nmax_restores = 2\n[[pool.boxes]]\nimage = "busybox"\nsize = 2\n'
        '[[pool.boxes]]\nimage = "debian-python"\nmemory_mib = 512\n'
    )
    assert got.max_restores == 2
    specs = [PoolSpec.from_mapping(b) for b in got.boxes]
    assert specs == [PoolSpec(size=2), PoolSpec("debian-python", memory_mib=512)]
    with pytest.raises(ConfigError, match="max_restores must be 1 to 4"):
        load("[pool]\nmax_restores = 9\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load("[pool]\nsize = 2\n")
    with pytest.raises(ConfigError, match="array of tables"):
        load('[pool]\nboxes = "busybox"\n')
    with pytest.raises(ConfigError, match=r"\[\[pool.boxes\]\] #1: colour"):
        load('[[pool.boxes]]\nimage = "busybox"\ncolour = 1\n')


def test_runtime_pool_argument(tmp_path: Path) -> None:
    rt = hutch.Runtime(tmp_path, pool=[{"image": "busybox", "size": 2}, PoolSpec("debian-python")])
    assert sorted(s.image for s in rt._pool_specs.values()) == ["busybox", "debian-python"]
    with pytest.raises(ConfigError, match="not one mapping"):
        hutch.Runtime(tmp_path, pool={"image": "busybox"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_restores"):
        hutch.Runtime(tmp_path, max_restores=5)
    with pytest.raises(ConfigError, match=r"pool\[0\]"):
        hutch.Runtime(tmp_path, pool=[{"image": "busybox", "size": "2"}])


# --- the store ------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[BoxStore]:
    s = BoxStore(tmp_path / "home" / "runtime.db")
    yield s
    s.close()


def snap_row(snap_id: str = "0000000000000000b1", **kw: object) -> Snapshot:
    values: dict[str, object] = {
        "id": snap_id,
        "name": None,
        "source_box": None,
        "image": "busybox",
        "image_id": None,
        "options": PoolSpec().options(),
        "accel": "tcg",
        "kernel": "/k/vmlinux",
        "initramfs": "/k/initramfs.cpio",
        "cmdline": "console=ttyS0",
        "auto_remove": True,
    }
    values.update(kw)
    return Snapshot(**values)  # type: ignore[arg-type]


def dead_process() -> ProcessIdentity:
    p = subprocess.Popen(["sleep", "30"])
    me = ProcessIdentity.of(p.pid)
    p.kill()
    p.wait()
    assert me is not None and not me.alive()
    return me


def test_pool_rows_are_invisible_until_handed_out(store: BoxStore) -> None:
    ordinary = store.insert(BoxRecord.new(BoxOptions(name="plain")))
    pooled = store.insert(BoxRecord.new(PoolSpec().options(), pool=POOL))
    assert [r.id for r in store.list()] == [ordinary.id]
    assert {r.id for r in store.list(include_pool=True)} == {ordinary.id, pooled.id}
    assert store.list("created") == [store.get(ordinary.id)]
    assert store.find(pooled.id) is None and store.find(pooled.id[:-1]) is None
    with pytest.raises(NotFoundError):
        store.get(pooled.id)
    assert store.by_id(pooled.id) is not None and store.exists(pooled.id)  # recovery sees it
    with pytest.raises(InvalidStateError, match="not a running box of the warm pool"):
        store.hand_out(pooled.id, pool=POOL, options=BoxOptions(), name="x")
    store.claim(pooled.id, state="running")
    with pytest.raises(InvalidStateError):
        store.hand_out(pooled.id, pool="another pool", options=BoxOptions(), name="x")
    # a taken name: refused, the box stays in its pool as it was
    with pytest.raises(ConflictError, match="'plain' is already taken"):
        store.hand_out(pooled.id, pool=POOL, options=BoxOptions(), name="plain")
    assert store.by_id(pooled.id).pool == POOL  # type: ignore[union-attr]
    mine = BoxOptions(env={"A": "1"}, auto_remove=False)
    before = time.time()
    rec = store.hand_out(pooled.id, pool=POOL, options=mine, name="mine")
    assert (rec.pool, rec.name, rec.options, rec.state) == (None, "mine", mine, "running")
    assert rec.created_at >= before
    assert store.get("mine").id == pooled.id
    assert [e.kind for e in store.events(pooled.id)][-1] == "handed-out"
    with pytest.raises(InvalidStateError):  # once only
        store.hand_out(pooled.id, pool=POOL, options=mine, name="again")


def test_a_held_snapshot_outlives_its_boxes_while_its_holder_lives(store: BoxStore) -> None:
    store.insert_snapshot(snap_row())
    store.hold_snapshot("0000000000000000b1", ProcessIdentity.current(), pool=POOL)
    got = store.get_snapshot("0000000000000000b1")
    assert (got.pool, got.holder_pid) == (POOL, os.getpid())
    assert not store.delete_snapshot(got.id, only_auto=True)  # held
    store.hold_snapshot(got.id, None)
    assert store.get_snapshot(got.id).pool == POOL  # kept when letting go
    assert store.delete_snapshot(got.id, only_auto=True)
    with pytest.raises(NotFoundError):
        store.hold_snapshot(got.id, None)
    # a dead holder holds nothing
    store.insert_snapshot(snap_row("0000000000000000b2"))
    store.hold_snapshot("0000000000000000b2", dead_process())
    assert store.delete_snapshot("0000000000000000b2", only_auto=True)


def test_schema_2_store_gains_the_pool_columns(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    with sqlite3.connect(path) as raw:
        _schema_1(raw)
        _schema_2(raw)
        raw.execute("PRAGMA user_version = 2")
        raw.execute(
            "INSERT INTO boxes (id, name, image, options, state, created_at, updated_at) "
            "VALUES ('00000000000000aa1', 'old', 'busybox', ?, 'stopped', 1, 1)",
            ('{"image": "busybox"}',),
        )
    raw.close()
    with BoxStore(path) as s:
        assert s.get("old").pool is None
        s.insert_snapshot(snap_row())
        assert s.get_snapshot("0000000000000000b1").holder_pid is None


def test_recovery_removes_pool_leftovers(tmp_path: Path) -> None:
    paths = HutchPaths(tmp_path / "home")
    paths.boxes.mkdir(parents=True)
    store = BoxStore.for_home(paths)
    owner = subprocess.Popen(["sleep", "60"])
    try:

        def pool_box(state: str) -> str:
            rec = store.insert(BoxRecord.new(PoolSpec().options(), pool=POOL))
            (paths.boxes / rec.id).mkdir()
            if state != "created":
                store.claim(rec.id, owner.pid, state="running")
            return rec.id

        running = pool_box("running")
        young = pool_box("created")
        old = pool_box("created")
        with store._write("test") as conn:  # unchanged for two minutes
            conn.execute("UPDATE boxes SET updated_at = ? WHERE id = ?", (time.time() - 120, old))
        kept = store.insert(BoxRecord.new(BoxOptions(name="kept")))
        store.claim(kept.id, owner.pid, state="running")
    finally:
        owner.kill()
        owner.wait()
    report = recover(store, paths, run_root=tmp_path / "run")
    gone = {b.id: b for b in report.boxes}
    assert gone[running].now == "removed" and gone[old].now == "removed"
    assert gone[kept.id].now == "stopped"  # an ordinary box: kept, stopped
    left = {r.id for r in store.list(include_pool=True)}
    assert left == {young, kept.id}
    assert not (paths.boxes / running).exists() and not (paths.boxes / old).exists()
    assert (paths.boxes / young).exists()
    store.close()


async def test_open_removes_a_young_snapshot_whose_pool_died(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rt = hutch.Runtime(home)
    store = rt.store
    for snap_id, holder in (
        ("0000000000000000c1", dead_process()),
        ("0000000000000000c2", ProcessIdentity.current()),
    ):
        store.insert_snapshot(snap_row(snap_id))
        store.hold_snapshot(snap_id, holder, pool=POOL)
        (snapshots_root(rt.paths) / snap_id).mkdir(parents=True)
    await rt.open()
    assert [s.id for s in await rt.snapshots()] == ["0000000000000000c2"]
    assert not (snapshots_root(rt.paths) / "0000000000000000c1").exists()
    await rt.close()


# --- a second RESTORE on a live portal (the agent in host test mode) -------------------------
@pytest_asyncio.fixture(loop_scope="session")
async def agent_channel(agent_binary: Path) -> AsyncIterator[PortalChannel]:
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "portal.sock")
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.set_result((r, w))

        server = await asyncio.start_unix_server(on_conn, sock)
        proc = await asyncio.create_subprocess_exec(str(agent_binary), "--portal-socket", sock)
        r, w = await asyncio.wait_for(accepted, 10)
        channel = PortalChannel(r, w, restoring=True)
        try:
            yield channel
        finally:
            await channel.close()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            server.close()


async def run_true(channel: PortalChannel) -> int | None:
    stream = await channel.spawn(SpawnRequest(["true"]))
    pid = await asyncio.wait_for(stream.started, 10)
    return (await asyncio.wait_for(Execution(stream, pid, None, 1 << 20).wait(), 10)).exit_code


async def test_reidentify_a_running_guest(agent_channel: PortalChannel) -> None:
    channel = agent_channel
    with pytest.raises(PortalError, match="needs a guest that said HELLO"):
        await channel.reidentify(Identity(hostname="early"))
    first = Identity(hostname="pool-box")
    await channel.restore(first)
    hello = await asyncio.wait_for(channel.wait_hello(), 10)
    assert hello.nonce == first.nonce
    assert await run_true(channel) == 0  # the pool's warm-up command
    for name in ("handed-out", "again"):
        new = Identity(hostname=name)
        again = await asyncio.wait_for(channel.reidentify(new), 10)
        assert again.nonce == new.nonce != first.nonce and again.version == hello.version
        assert await run_true(channel) == 0  # streams go on after the agent detached
    assert not channel.is_closed
