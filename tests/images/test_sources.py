"""Local sources → stored images with real base disks (real fakeroot, mkfs.ext4 and debugfs)."""

from __future__ import annotations

import gzip
import subprocess
import tarfile
from pathlib import Path

import pytest

from hutch.errors import BadRequestError, ImageError, NotFoundError
from hutch.images.sources import load
from hutch.images.store import ImageStore
from hutch.paths import HutchPaths
from tests.support.images import busybox_layer, sha, write_docker_save, write_oci_layout


def debugfs(image: Path, cmd: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", cmd, str(image)], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[images]\nbase_size = "512M"\n')
    return ImageStore(HutchPaths(home))


def test_oci_layout_folder(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digests = write_oci_layout(
        layout,
        [busybox_layer(), busybox_layer({"opt/hello": b"#!/bin/sh\necho hi\n"})],
        {"Cmd": ["/opt/hello"], "WorkingDir": "/opt", "User": "app"},
    )
    rec = load(layout, store=store, tag="localhost/oci-test:1")
    assert rec.id == digests["config"]
    assert rec.manifest_digest == digests["manifest"]
    assert rec.references == ("localhost/oci-test:1",)
    assert rec.config.cmd == ("/opt/hello",) and rec.config.user == "app"
    assert rec.base_size == 512 << 20 and rec.base_path.stat().st_size == 512 << 20
    assert "Type: regular" in debugfs(rec.base_path, "stat /opt/hello")
    assert "User:  1234" in debugfs(rec.base_path, "stat /home/app")
    assert store.lookup("localhost/oci-test:1") == rec
    # loading the same content again is a no-op that only adds the name
    again = load(layout, store=store)
    assert again.id == rec.id and set(again.references) >= {"localhost/oci-test:1"}


def test_oci_archive_tar(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, [busybox_layer()], tag="localhost/from-archive:2")
    archive = tmp_path / "img.oci.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(layout, arcname=".")
    rec = load(archive, store=store)
    assert rec.references == ("localhost/from-archive:2",)


def test_docker_save_tar(store: ImageStore, tmp_path: Path) -> None:
    tar = tmp_path / "saved.tar"
    cfg = write_docker_save(tar, [busybox_layer()], {"Env": ["X=1"]}, ["myapp:3"])
    rec = load(tar, store=store)
    assert rec.id == cfg
    assert rec.references == ("docker.io/library/myapp:3",)
    assert ("X", "1") in rec.config.env


def test_rootfs_tarball_and_folder(store: ImageStore, tmp_path: Path) -> None:
    gz = tmp_path / "rootfs.tar.gz"
    gz.write_bytes(gzip.compress(busybox_layer()))
    rec = load(gz, store=store, tag="rootfs-gz")
    assert rec.config.diff_ids == (sha(busybox_layer()),)  # diff_id of the *uncompressed* tar
    assert rec.config.cmd == ("/bin/sh",)
    assert "Type: symlink" in debugfs(rec.base_path, "stat /bin/sh")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello\n")
    rec2 = load(tree, store=store)
    assert rec2.references == ("localhost/tree:latest",)
    assert "Size: 6" in debugfs(rec2.base_path, "stat /etc/motd")


def test_tampered_oci_blob(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, [busybox_layer()], {})
    index = (layout / "index.json").read_text()
    import json

    manifest_digest = json.loads(index)["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    layer = layout / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=manifest["layers"][0]["digest"]):
        load(layout, store=store)
    assert store.blobs.get(manifest["layers"][0]["digest"]) is None
    assert store.list() == []


def test_bad_sources(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load(tmp_path / "nope.tar", store=store)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a tar at all" * 10)
    with pytest.raises(BadRequestError, match="neither a folder nor a tar"):
        load(junk, store=store)
    with pytest.raises(BadRequestError, match="invalid image reference"):
        load(tmp_path, store=store, tag="Bad Name")
