"""`pull` end to end against a real registry: store, blob cache, base disk, boxes, CLI."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import hutch
from hutch.errors import ImageError
from hutch.images.oci import Platform
from hutch.images.pull import PullEvent, pull
from hutch.images.store import ImageStore
from hutch.paths import HutchPaths
from tests.conftest import hutch_cli
from tests.support.homes import make_home
from tests.support.images import busybox_layer
from tests.support.push import push_image, push_index
from tests.support.registry import RegistryServer
from tests.support.tarbuild import File, tar_bytes

pytestmark = pytest.mark.registry

APP_LAYER = tar_bytes([File("opt/msg", b"from the second layer\n", mode=0o644)])
CONFIG = {"config": {"Env": ["PATH=/bin", "WHO=pulled"], "Cmd": ["sh", "-c", "cat /opt/msg"]}}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path / "home")


def _events() -> tuple[list[PullEvent], object]:
    seen: list[PullEvent] = []
    return seen, seen.append


@pytest.mark.vm
@pytest.mark.parametrize(
    ("fmt", "compression"), [("oci", "zstd"), ("docker", "gzip")], ids=["oci-zstd", "docker-gzip"]
)
async def test_pull_and_boot(
    registry: RegistryServer, home: Path, fmt: str, compression: str
) -> None:
    pushed = push_image(
        registry.url,
        f"it/{fmt}",
        "1",
        [busybox_layer(), APP_LAYER],
        CONFIG,
        fmt=fmt,
        compression=compression,  # type: ignore[arg-type]
    )
    events, on_event = _events()
    ref = f"{registry.host}/it/{fmt}:1"
    rec = await pull(ref, paths=HutchPaths(home), progress=on_event)  # type: ignore[arg-type]
    assert rec.id == pushed.config_digest and rec.manifest_digest == pushed.manifest_digest
    assert [layer.diff_id for layer in rec.layers] == pushed.diff_ids
    done = {e.digest for e in events if e.kind == "layer" and e.message == "done"}
    assert done == set(pushed.layer_digests)
    async with hutch.Box(ref, home=home) as box:
        r = await box.exec()  # the image's Cmd
        assert r.stdout == "from the second layer\n", r.stderr
        assert (await box.exec("sh", "-c", "echo $WHO")).stdout == "pulled\n"
        assert box.image_ms is not None


async def test_second_pull_downloads_nothing_and_boxes_need_no_registry(
    fresh_registry: RegistryServer, home: Path
) -> None:
    push_image(fresh_registry.url, "it/again", "1", [busybox_layer(), APP_LAYER], CONFIG)
    ref = f"{fresh_registry.host}/it/again:1"
    first = await pull(ref, paths=HutchPaths(home))
    events, on_event = _events()
    second = await pull(ref, paths=HutchPaths(home), progress=on_event)  # type: ignore[arg-type]
    assert second.id == first.id
    assert [e for e in events if e.kind == "layer"] == []
    assert any("up to date" in e.message for e in events)
    # with the registry gone, a box still resolves the cached image (no network I/O at all)
    fresh_registry.stop()
    from hutch.images.pull import ensure_image

    rec = await ensure_image(ref, paths=HutchPaths(home))
    assert rec.id == first.id


async def test_concurrent_pulls_share_blobs_and_build_once(
    registry: RegistryServer, home: Path
) -> None:
    push_image(registry.url, "it/conc", "1", [busybox_layer(), APP_LAYER], CONFIG)
    ref = f"{registry.host}/it/conc:1"
    a, b = await asyncio.gather(
        pull(ref, paths=HutchPaths(home)), pull(ref, paths=HutchPaths(home))
    )
    assert a.id == b.id and a.base == b.base
    store = ImageStore(HutchPaths(home))
    assert [r.id for r in store.list()] == [a.id]
    assert not [p for p in store.records.iterdir() if p.name.startswith(".base-")]


async def test_multi_arch_index_picks_the_platform(registry: RegistryServer, home: Path) -> None:
    amd = push_image(
        registry.url, "it/multi", None, [busybox_layer()], {"config": {"Env": ["ARCH=amd"]}}
    )
    arm = push_image(
        registry.url, "it/multi", None, [busybox_layer()], {"config": {"Env": ["ARCH=arm"]}}
    )
    index = push_index(
        registry.url,
        "it/multi",
        "1",
        [(amd, Platform("linux", "amd64")), (arm, Platform("linux", "arm64", "v8"))],
    )
    rec = await pull(f"{registry.host}/it/multi:1", paths=HutchPaths(home))
    assert rec.id == amd.config_digest and rec.index_digest == index.digest
    rec_arm = await pull(
        f"{registry.host}/it/multi:1", paths=HutchPaths(home), platform="linux/arm64"
    )
    assert rec_arm.id == arm.config_digest
    with pytest.raises(ImageError, match="linux/amd64"):
        await pull(f"{registry.host}/it/multi:1", paths=HutchPaths(home), platform="linux/s390x")


async def test_tampered_blob_is_refused_and_not_cached(
    fresh_registry: RegistryServer, home: Path
) -> None:
    pushed = push_image(fresh_registry.url, "it/tamper", "1", [busybox_layer(), APP_LAYER], CONFIG)
    bad = pushed.layer_digests[1]
    blob = fresh_registry.blob_path(bad)
    original = blob.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    ref = f"{fresh_registry.host}/it/tamper:1"
    with pytest.raises(ImageError, match=bad):
        await pull(ref, paths=HutchPaths(home))
    store = ImageStore(HutchPaths(home))
    assert store.blobs.get(bad) is None and store.lookup(ref) is None
    blob.write_bytes(original)  # repaired: the next pull succeeds
    rec = await pull(ref, paths=HutchPaths(home))
    assert rec.id == pushed.config_digest


async def test_registry_gone_mid_pull_then_resume(
    fresh_registry: RegistryServer, home: Path
) -> None:
    big = tar_bytes([File("data/random.bin", os.urandom(24 << 20))])
    pushed = push_image(
        fresh_registry.url, "it/big", "1", [busybox_layer(), big], CONFIG, compression="none"
    )
    ref = f"{fresh_registry.host}/it/big:1"
    stopped: list[int] = []

    def on_event(ev: PullEvent) -> None:
        if ev.digest == pushed.layer_digests[1] and ev.done > (4 << 20) and not stopped:
            stopped.append(ev.done)
            fresh_registry.stop()

    (home / "config.toml").write_text('[images]\nbase_size = "256M"\n')
    with pytest.raises(ImageError, match="resumes"):
        await pull(ref, paths=HutchPaths(home), progress=on_event)
    store = ImageStore(HutchPaths(home))
    partial = store.blobs.partial_path(pushed.layer_digests[1])
    kept = partial.stat().st_size
    assert kept >= stopped[0]
    fresh_registry.start()
    events, log = _events()
    rec = await pull(ref, paths=HutchPaths(home), progress=log)  # type: ignore[arg-type]
    assert rec.id == pushed.config_digest
    first = next(e for e in events if e.digest == pushed.layer_digests[1] and e.done > 0)
    assert first.done >= kept  # progress started where the first attempt stopped


def test_cli_pull_images_rmi_prune(registry: RegistryServer, home: Path) -> None:
    push_image(registry.url, "it/cli", "7", [busybox_layer(), APP_LAYER], CONFIG)
    env = {"HUTCH_HOME": str(home)}
    ref = f"{registry.host}/it/cli:7"
    r = hutch_cli("pull", ref, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith(f"{ref} sha256:")
    assert b"done" in r.stderr  # per-layer progress lines when not on a terminal
    listing = json.loads(hutch_cli("images", "--json", env_extra=env).stdout)
    assert [img["references"] for img in listing] == [[ref]]
    missing = hutch_cli("pull", f"{registry.host}/it/cli:nope", env_extra=env)
    assert missing.returncode == 125 and b"not found" in missing.stderr
    rm = hutch_cli("rmi", ref, env_extra=env)
    assert rm.returncode == 0 and b"deleted: sha256:" in rm.stdout
    prune = hutch_cli("prune", env_extra=env)
    assert prune.returncode == 0 and b"freed" in prune.stdout
    assert ImageStore(HutchPaths(home)).blobs.entries() == []
