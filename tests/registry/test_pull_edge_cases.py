"""The whiteout/link/xattr edge-case image, pushed to a real registry with one gzip, one zstd and
one plain layer, pulled by hutch: its base ext4 matches the layers entry by entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hutch.images.oci import OCI_CONFIG, OCI_MANIFEST
from hutch.images.pull import pull
from hutch.paths import HutchPaths
from tests.support.homes import make_home
from tests.support.push import push_blob, push_manifest
from tests.support.registry import RegistryServer
from tests.unit.test_rootfs import (
    EXPECTED,
    EXTRA,
    SAME_INODE,
    check_disk,
    edge_case_layers,
    need_tools,
)

pytestmark = pytest.mark.registry


def _added_by_extra_files() -> set[str]:
    """Entries the unit test's extra_files create (a pull adds none)."""
    out = set(EXTRA)
    for path in EXTRA:
        parts = path.split("/")
        out |= {"/".join(parts[:i]) for i in range(1, len(parts))}
    return out - {"etc", "usr"}


async def test_pulled_edge_case_image_matches_entry_by_entry(
    registry: RegistryServer, tmp_path: Path
) -> None:
    need_tools()
    layers = edge_case_layers(tmp_path / "blobs")
    assert {x.compression for x in layers} == {"gzip", "zstd", ""}
    descs = []
    for layer in layers:
        digest = push_blob(registry.url, "it/edge", layer.path.read_bytes())
        assert digest == layer.digest
        descs.append(
            {"mediaType": layer.media_type, "digest": digest, "size": layer.path.stat().st_size}
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": push_blob(registry.url, "it/edge", config),
            "size": len(config),
        },
        "layers": descs,
    }
    push_manifest(registry.url, "it/edge", "1", manifest, OCI_MANIFEST)

    home = make_home(tmp_path / "home", base_size="256M")
    rec = await pull(f"{registry.host}/it/edge:1", paths=HutchPaths(home))
    expected = {k: v for k, v in EXPECTED.items() if k not in _added_by_extra_files()}
    check_disk(rec.base_path, expected, SAME_INODE, tmp_path / "debugfs")
