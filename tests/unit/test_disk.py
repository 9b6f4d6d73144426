"""Box disk overlays, made by qemu-img or copied from the per-image template (real qemu-img)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hutch.errors import StorageError
from hutch.vm.disk import create_overlay, ensure_overlay_template, template_for


def backing_of(disk: Path) -> str:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    return str(info["backing-filename"])


async def test_overlay_without_and_with_template(tmp_path: Path) -> None:
    base = tmp_path / "img" / "rootfs.ext4"
    base.parent.mkdir()
    with base.open("wb") as f:
        f.truncate(64 << 20)
    await create_overlay(base, tmp_path / "a.qcow2")  # no template yet: qemu-img
    assert backing_of(tmp_path / "a.qcow2") == str(base)
    template = ensure_overlay_template(base)
    assert template == template_for(base) and template.stat().st_mode & 0o222 == 0
    assert ensure_overlay_template(base) == template  # idempotent
    await create_overlay(base, tmp_path / "b.qcow2")  # copied from the template
    assert backing_of(tmp_path / "b.qcow2") == str(base)
    assert (tmp_path / "b.qcow2").read_bytes() == template.read_bytes()
    (tmp_path / "b.qcow2").write_bytes(b"writable")  # a box's copy is its own, writable


async def test_overlay_in_a_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    base = tmp_path / "rootfs.ext4"
    base.write_bytes(b"")
    ensure_overlay_template(base)
    with pytest.raises(StorageError, match="MiB free"):
        await create_overlay(base, tmp_path / "no" / "such" / "dir" / "disk.qcow2")
