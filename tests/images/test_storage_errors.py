"""A full or read-only hutch home gives StorageError naming the path and the free space."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hutch.errors import StorageError
from hutch.images.sources import load
from hutch.images.store import ImageStore
from hutch.paths import HutchPaths
from tests.support.images import busybox_layer, sha, write_oci_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_home(small_mount: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layer = busybox_layer({"big": os.urandom(4 << 20)})
    write_oci_layout(layout, [layer], compress=False)
    store = ImageStore(HutchPaths(small_mount / "home"), cache_max_bytes=1 << 30)
    with pytest.raises(StorageError) as e:
        load(layout, store=store, tag="localhost/big:1")
    assert str(small_mount) in e.value.message and "MiB free" in e.value.message
    assert "prune" in e.value.hint
    assert store.list() == []
    assert store.blobs.get(sha(layer)) is None  # the half-copied layer never got its name
    assert list((small_mount / "home/images/blobs/partial").iterdir()) == []


def test_read_only_home(small_mount: Path, tmp_path: Path) -> None:
    (small_mount / "home").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    layout = tmp_path / "layout"
    write_oci_layout(layout, [busybox_layer()])
    store = ImageStore(HutchPaths(small_mount / "home"), cache_max_bytes=1 << 30)
    with pytest.raises(StorageError) as e:
        load(layout, store=store, tag="localhost/ro:1")
    assert str(small_mount / "home") in e.value.message
    assert "writable" in e.value.hint
