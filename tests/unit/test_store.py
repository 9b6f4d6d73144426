"""The image store: names, ids, removal rules and pruning, on a real folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hutch.errors import ConfigError, ConflictError, ImageError, NotFoundError
from hutch.images.oci import ImageConfig
from hutch.images.store import BOX_IMAGE_FILE, ImageRecord, ImageStore
from hutch.paths import HutchPaths


def make_record(n: int, *refs: str) -> ImageRecord:
    return ImageRecord(
        id="sha256:" + f"{n:02x}" * 32,
        references=tuple(refs),
        source="archive test",
        platform="linux/amd64",
        base="",
        base_size=1 << 30,
        config=ImageConfig("amd64", "linux", (), cmd=("/bin/sh",), env=(("A", "1"),)),
        manifest_digest="sha256:" + f"{n + 100:02x}" * 32,
    )


def add(store: ImageStore, tmp: Path, rec: ImageRecord) -> ImageRecord:
    base = tmp / f"base-{rec.short_id}"
    base.write_bytes(b"ext4")
    with store.locked():
        return store.add(rec, base_file=base)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(HutchPaths(tmp_path / "home"), cache_max_bytes=1 << 30)


def test_lookup_by_reference_id_and_digest(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(1, "docker.io/library/alpine:3"))
    assert rec.base_path.read_bytes() == b"ext4"
    assert rec.base_path.parent == store.record_dir(rec.id)
    assert store.lookup("alpine:3") == rec
    assert store.lookup("docker.io/library/alpine:3") == rec
    assert store.lookup(rec.id) == rec
    assert store.lookup(rec.short_id) == rec
    assert store.lookup(f"alpine@{rec.manifest_digest}") == rec
    assert store.lookup("alpine:4") is None
    assert store.lookup("ffffffffffffffff") is None
    got = store.get(rec.id)
    assert got is not None and got.config.env == (("A", "1"),)


def test_same_content_is_stored_once(store: ImageStore, tmp_path: Path) -> None:
    add(store, tmp_path, make_record(1, "docker.io/library/a:1"))
    merged = add(store, tmp_path, make_record(1, "docker.io/library/b:1"))
    assert set(merged.references) == {"docker.io/library/a:1", "docker.io/library/b:1"}
    assert len(store.list()) == 1


def test_moving_a_tag_leaves_the_old_image_dangling(store: ImageStore, tmp_path: Path) -> None:
    old = add(store, tmp_path, make_record(1, "docker.io/library/app:latest"))
    new = add(store, tmp_path, make_record(2, "docker.io/library/app:latest"))
    assert store.lookup("app") == new
    dangling = store.get(old.id)
    assert dangling is not None and dangling.references == ()
    deleted, _ = store.prune()
    assert deleted == [old.id]
    assert store.get(old.id) is None and store.lookup("app") == new


def test_rmi_untags_then_deletes(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(3, "docker.io/library/x:1", "docker.io/library/y:1"))
    assert store.remove("x:1") == ["untagged: x:1"]
    assert store.lookup("x:1") is None and store.lookup("y:1") is not None
    assert store.remove("y:1") == ["untagged: y:1", f"deleted: {rec.id}"]
    assert not store.record_dir(rec.id).exists()
    with pytest.raises(NotFoundError, match="hutch pull"):
        store.remove("y:1")


def test_rmi_by_id_removes_every_name(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(4, "docker.io/library/x:1", "docker.io/library/y:1"))
    out = store.remove(rec.short_id)
    assert out[-1] == f"deleted: {rec.id}" and len(out) == 3


def test_images_in_use_are_not_deleted(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(5, "docker.io/library/busy:1"))
    box = store.paths.boxes / "0123abc"
    box.mkdir(parents=True)
    (box / BOX_IMAGE_FILE).write_text(rec.id)
    with pytest.raises(ConflictError, match="0123abc"):
        store.remove("busy:1")
    assert store.lookup("busy:1") == rec  # nothing was changed
    assert store.remove("busy:1", force=True)[-1] == f"deleted: {rec.id}"


def test_images_snapshots_build_on_are_not_deleted(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(9, "docker.io/library/snapped:1"))
    snap = store.paths.snapshots / "0456def"
    snap.mkdir(parents=True)
    (snap / BOX_IMAGE_FILE).write_text(rec.id)
    partial = store.paths.snapshots / ".partial-0789-1"  # being written: not a user yet
    partial.mkdir()
    (partial / BOX_IMAGE_FILE).write_text(rec.id)
    assert store.users(rec.id) == ["snapshot 0456def"]
    with pytest.raises(ConflictError, match="snapshot 0456def"):
        store.remove("snapped:1")
    assert store.lookup("snapped:1") == rec  # nothing was changed


def test_ambiguous_id_prefix(store: ImageStore, tmp_path: Path) -> None:
    a = replace(make_record(6, "docker.io/library/a:1"), id="sha256:abcdef012345" + "0" * 52)
    b = replace(make_record(7, "docker.io/library/b:1"), id="sha256:abcdef012345" + "1" * 52)
    add(store, tmp_path, a)
    b = add(store, tmp_path, b)
    with pytest.raises(ConflictError, match="ambiguous"):
        store.lookup("abcdef012345")
    assert store.lookup("abcdef0123451") == b


def test_corrupt_records_are_reported(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(8, "docker.io/library/c:1"))
    (store.record_dir(rec.id) / "image.json").write_text("{")
    with pytest.raises(ImageError, match="hutch rmi"):
        store.lookup("c:1")
    store.refs_file.write_text("not json")
    with pytest.raises(ImageError, match="refs.json"):
        store.lookup("c:1")


def test_tag_adds_a_name(store: ImageStore, tmp_path: Path) -> None:
    rec = add(store, tmp_path, make_record(9, "docker.io/library/t:1"))
    store.tag("localhost:5000/mine/t:2", "t:1")
    assert store.lookup("localhost:5000/mine/t:2") is not None
    assert set(json.loads(store.refs_file.read_text())) == {
        "docker.io/library/t:1",
        "localhost:5000/mine/t:2",
    }
    assert store.lookup(rec.id) is not None


def test_images_config_sizes(tmp_path: Path) -> None:
    from hutch.config import ImagesConfig, parse_size

    assert parse_size("8G", "x") == 8 << 30
    assert parse_size("512MiB", "x") == 512 << 20
    assert parse_size(1234, "x") == 1234
    for bad in ("8X", -1, "G", True):
        with pytest.raises(ConfigError):
            parse_size(bad, "x")
    paths = HutchPaths(tmp_path)
    (tmp_path / "config.toml").write_text('[images]\ncache_max_bytes = "1G"\nbase_size = "4G"\n')
    assert ImagesConfig.load(paths) == ImagesConfig(1 << 30, 4 << 30)
    (tmp_path / "config.toml").write_text("[images]\nbase_sise = 1\n")
    with pytest.raises(ConfigError, match="base_sise"):
        ImagesConfig.load(paths)
    (tmp_path / "config.toml").write_text("[images\n")
    with pytest.raises(ConfigError, match="TOML"):
        ImagesConfig.load(paths)
