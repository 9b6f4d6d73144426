"""Per-box root disks: a qcow2 overlay on the image's read-only base ext4.

Every overlay of one base is the same small file (a qcow2 header naming the base by absolute path),
so ``hutch setup`` writes it once with ``qemu-img`` as a *template* next to the base, and each box
gets a copy of it (a fraction of a millisecond, against ~18 ms for running ``qemu-img``). Without a
template (e.g. an image added later) ``qemu-img create`` runs as before.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from hutch.errors import EngineError, StorageError

TEMPLATE_NAME = "overlay-template.qcow2"


def storage_error(where: Path, e: OSError | str) -> StorageError:
    """A StorageError naming the path and the free space of its filesystem."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"; {shutil.disk_usage(probe).free / 2**20:.0f} MiB free on {probe}"
    except OSError:
        free = ""
    reason = (e.strerror or str(e)) if isinstance(e, OSError) else e
    return StorageError(
        f"cannot write {where}: {reason}{free}",
        hint="Free some space or fix the permissions there, or set HUTCH_HOME to another folder.",
    )


def _qemu_img() -> str:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise EngineError(
            "qemu-img is not installed", hint="Run `hutch setup` (installs qemu-utils)."
        )
    return qemu_img


def _create_args(base: Path, disk: Path) -> list[str]:
    return [
        _qemu_img(),
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(base.absolute()),
        "-F",
        "raw",
        str(disk),
    ]


def template_for(base: Path) -> Path:
    return base.with_name(TEMPLATE_NAME)


def ensure_overlay_template(base: Path) -> Path:
    """Write the overlay template next to ``base`` (once; atomically)."""
    template = template_for(base)
    if template.is_file():
        return template
    tmp = template.with_name(f".{TEMPLATE_NAME}.{os.getpid()}")
    proc = subprocess.run(_create_args(base, tmp), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise storage_error(template, f"qemu-img create failed: {proc.stderr.strip()}")
    os.chmod(tmp, 0o444)
    os.replace(tmp, template)
    return template


async def create_overlay(base: Path, disk: Path) -> None:
    """Create ``disk`` as a fresh copy-on-write overlay of ``base``."""
    template = template_for(base)
    if template.is_file():
        try:
            shutil.copyfile(template, disk)
            os.chmod(disk, 0o644)
            return
        except OSError as e:
            disk.unlink(missing_ok=True)
            raise storage_error(disk, e) from e
    proc = await asyncio.create_subprocess_exec(
        *_create_args(base, disk), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise storage_error(disk, f"qemu-img create failed: {err.decode(errors='replace').strip()}")


def disk_size_bytes(disk: Path) -> int:
    """The virtual size of a qcow2 overlay (big-endian u64 at offset 24 of its header)."""
    try:
        with open(disk, "rb") as f:
            header = f.read(32)
    except OSError as e:
        raise storage_error(disk, e) from e
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise StorageError(
            f"{disk} is not a qcow2 disk", hint="Remove the box and create it again."
        )
    return int.from_bytes(header[24:32], "big")


async def grow_overlay(disk: Path, size_bytes: int) -> None:
    """Make the overlay ``disk`` ``size_bytes`` large (the guest agent then grows its ext4)."""
    proc = await asyncio.create_subprocess_exec(
        _qemu_img(),
        "resize",
        "-q",
        "-f",
        "qcow2",
        str(disk),
        str(size_bytes),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise storage_error(disk, f"qemu-img resize failed: {err.decode(errors='replace').strip()}")
