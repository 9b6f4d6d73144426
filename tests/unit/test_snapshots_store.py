"""Snapshot records in the runtime store, the snapshot folder helpers and the sparse copy — the
pure parts of snapshots (no QEMU)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hutch.errors import ConfigError, ConflictError, NotFoundError, StorageError
from hutch.paths import HutchPaths
from hutch.runtime.options import BoxOptions, Port
from hutch.runtime.snapshots import (
    DISK_FILE,
    OVERLAY_TEMPLATE,
    RAM_FILE,
    STATE_FILE,
    Snapshot,
    check_folder,
    clone_disk,
    clone_options,
    finish_folder,
    partial_folder,
    snapshots_root,
    sweep,
)
from hutch.runtime.store import BoxRecord, BoxStore, _schema_1
from hutch.vm.disk import PAGE, allocated_bytes, copy_sparse


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BoxStore]:
    s = BoxStore(tmp_path / "home" / "runtime.db")
    yield s
    s.close()


def snapshot(snap_id: str = "0000000000000000a1", **kw: object) -> Snapshot:
    values: dict[str, object] = {
        "id": snap_id,
        "name": None,
        "source_box": None,
        "image": "busybox",
        "image_id": "sha256:" + "0" * 64,
        "options": BoxOptions(memory_mib=256, env={"A": "1"}),
        "accel": "tcg",
        "kernel": "/k/vmlinux",
        "initramfs": "/k/initramfs.cpio",
        "cmdline": "console=ttyS0",
        "ram_bytes": 3 << 20,
        "disk_bytes": 1 << 20,
        "state_bytes": 50_000,
    }
    values.update(kw)
    return Snapshot(**values)  # type: ignore[arg-type]


def test_insert_find_list_round_trip(store: BoxStore) -> None:
    src = store.insert(BoxRecord.new(BoxOptions(name="src")))
    a = store.insert_snapshot(snapshot(name="base", source_box=src.id))
    b = store.insert_snapshot(snapshot("0000000000000000b2", auto_remove=True))
    assert store.get_snapshot("base") == a
    assert store.get_snapshot(a.id) == a and store.find_snapshot(b.id[:17]) == b
    assert store.get_snapshot(b.id).auto_remove is True
    assert [s.id for s in store.list_snapshots()] == [a.id, b.id]
    assert a.options.env["A"] == "1" and a.cpus == 1 and a.memory_mib == 256
    assert a.size_bytes == (3 << 20) + (1 << 20) + 50_000
    assert [e.kind for e in store.events(src.id)][-1] == "snapshot"  # on the source's record
    with pytest.raises(ConflictError, match="ambiguous"):
        store.get_snapshot("0000")
    with pytest.raises(NotFoundError):
        store.get_snapshot("nope")
    with pytest.raises(ConflictError, match="already taken"):
        store.insert_snapshot(snapshot("0000000000000000c3", name="base"))


def test_boxes_made_from_a_snapshot_keep_it(store: BoxStore) -> None:
    snap = store.insert_snapshot(snapshot(name="base"))
    box = store.insert(BoxRecord.new(BoxOptions(), snapshot_id=snap.id))
    assert store.get(box.id).snapshot_id == snap.id
    assert store.snapshot_users(snap.id) == [box.id]
    assert "from snapshot" in store.events(box.id)[0].detail
    with pytest.raises(ConflictError, match=box.id):
        store.delete_snapshot(snap.id)
    assert store.delete_snapshot(snap.id, only_auto=True) is False  # not auto_remove anyway
    store.delete(box.id)
    assert store.delete_snapshot(snap.id) is True
    with pytest.raises(NotFoundError, match="removed"):  # the foreign key: no box from a ghost
        store.insert(BoxRecord.new(BoxOptions(), snapshot_id=snap.id))


def test_auto_remove_snapshot_goes_with_its_last_box(store: BoxStore) -> None:
    snap = store.insert_snapshot(snapshot(auto_remove=True))
    boxes = [store.insert(BoxRecord.new(BoxOptions(), snapshot_id=snap.id)) for _ in range(2)]
    store.delete(boxes[0].id)
    assert store.delete_snapshot(snap.id, only_auto=True) is False  # one box left
    store.delete(boxes[1].id)
    assert store.delete_snapshot(snap.id, only_auto=True) is True
    assert store.find_snapshot(snap.id) is None
    assert store.delete_snapshot(snap.id, only_auto=True) is False  # already gone: no error


def test_version_1_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    with sqlite3.connect(path) as raw:  # a store as hutch wrote it before snapshots
        _schema_1(raw)
        raw.execute(
            "INSERT INTO boxes (id, name, image, options, state, created_at, updated_at) "
            "VALUES ('000000000000000001', 'old', 'busybox', ?, 'stopped', 1, 1)",
            (json.dumps(BoxOptions().to_json()),),
        )
        raw.execute("PRAGMA user_version = 1")
    with BoxStore(path) as s:
        old = s.get("old")
        assert (old.state, old.snapshot_id) == ("stopped", None)
        snap = s.insert_snapshot(snapshot())
        s.insert(BoxRecord.new(BoxOptions(), snapshot_id=snap.id))
        assert s.snapshot_users(snap.id)


def test_clone_options_keep_the_machine() -> None:
    base = BoxOptions(memory_mib=512, env={"A": "1"}, labels={"team": "x"})
    snap = snapshot(options=base)
    opts = clone_options(snap, None, {"name": "c1", "env": {"B": "2"}, "auto_remove": True})
    assert (opts.name, opts.memory_mib, dict(opts.env), opts.auto_remove) == (
        "c1",
        512,
        {"B": "2"},
        True,
    )
    assert clone_options(snap, None, {"memory_mib": 512}).memory_mib == 512  # same: fine
    with pytest.raises(ConfigError, match="memory_mib must be the snapshot's"):
        clone_options(snap, None, {"memory_mib": 256})
    with pytest.raises(ConfigError, match="unknown option"):
        clone_options(snap, None, {"nonsense": 1})
    with pytest.raises(ConfigError, match="ports"):
        clone_options(snap, dataclasses.replace(base, ports=(Port(8080, 80),)), {})
    full = clone_options(snap, dataclasses.replace(base, name="c2", user="1000"), {})
    assert (full.name, full.user, full.memory_mib) == ("c2", "1000", 512)
    with pytest.raises(ConfigError, match="either"):
        clone_options(snap, base, {"name": "x"})


def test_copy_sparse_keeps_holes_and_drops_zero_pages(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    size = 64 << 20
    data = {0: os.urandom(PAGE), 10 * PAGE + 0: os.urandom(3 * PAGE), (40 << 20): b"x" * 100}
    with src.open("wb") as f:
        f.truncate(size)
        f.seek(20 << 20)
        f.write(bytes(2 << 20))  # written zeroes: allocated in src, a hole in the copy
        for off, blob in data.items():
            f.seek(off)
            f.write(blob)
    dst = tmp_path / "copy"
    written = copy_sparse(src, dst, skip_zero_pages=True)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == size and dst.stat().st_mode & 0o777 == 0o600
    assert written == 5 * PAGE  # the zero pages and the holes were not written
    assert allocated_bytes(dst) < allocated_bytes(src)
    plain = tmp_path / "plain"
    copy_sparse(src, plain)
    assert plain.read_bytes() == src.read_bytes()
    with pytest.raises(FileExistsError):
        copy_sparse(src, plain)  # never overwrites


def test_folder_completion_clone_disk_and_checks(tmp_path: Path) -> None:
    paths = HutchPaths(tmp_path / "home")
    base = tmp_path / "base.ext4"
    with base.open("wb") as f:
        f.truncate(64 << 20)
    partial = partial_folder(paths, "0000000000000000a1")
    partial.mkdir(parents=True)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(base),
            "-F",
            "raw",
            str(partial / DISK_FILE),
        ],
        check=True,
    )
    (partial / RAM_FILE).write_bytes(b"ram")
    (partial / STATE_FILE).write_bytes(b"state")
    final = snapshots_root(paths) / "0000000000000000a1"
    with pytest.raises(StorageError, match="missing"):
        check_folder(partial)
    finish_folder(partial, final, "sha256:abc")
    assert not partial.exists()
    check_folder(final)
    assert (final / "image.id").read_text() == "sha256:abc"
    disk = tmp_path / "box.qcow2"
    clone_disk(final, disk)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert info["backing-filename"] == str(final / DISK_FILE)
    assert info["backing-filename-format"] == "qcow2"
    (final / OVERLAY_TEMPLATE).chmod(0o644)
    (final / OVERLAY_TEMPLATE).unlink()
    with pytest.raises(StorageError, match="incomplete"):
        clone_disk(final, tmp_path / "other.qcow2")


def test_sweep_removes_leftovers(tmp_path: Path) -> None:
    paths = HutchPaths(tmp_path / "home")
    root = snapshots_root(paths)
    known, orphan, young, mine = (root / n for n in ("a" * 17, "b" * 17, "c" * 17, "x"))
    dead = root / ".partial-ddddddddddddddddd-999999999"
    live = partial_folder(paths, "e" * 17)
    for d in (known, orphan, young, dead, live):
        d.mkdir(parents=True)
    old = time.time() - 3600
    for d in (known, orphan, dead):
        os.utime(d, (old, old))
    removed = sweep(paths, {known.name})
    assert sorted(removed) == sorted([orphan, dead])
    assert known.exists() and young.exists() and live.exists() and not mine.exists()
