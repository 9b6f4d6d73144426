"""Per-box root disks: a qcow2 overlay on the image's read-only base ext4.

Every overlay of one base is the same small file (a qcow2 header naming the base by absolute path),
so ``hutch setup`` writes it once with ``qemu-img`` as a *template* next to the base, and each box
gets a copy of it (a fraction of a millisecond, against ~18 ms for running ``qemu-img``). Without a
template (e.g. an image added later) ``qemu-img create`` runs as before.
"""

from __future__ import annotations

import asyncio
import errno
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


def _create_args(base: Path, disk: Path, base_format: str = "raw") -> list[str]:
    return [
        _qemu_img(),
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(base.absolute()),
        "-F",
        base_format,
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


def write_overlay(backing: Path, disk: Path, backing_format: str = "qcow2") -> None:
    """Write ``disk`` as a new qcow2 overlay of ``backing`` (blocking: runs ``qemu-img``)."""
    proc = subprocess.run(
        _create_args(backing, disk, backing_format), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        disk.unlink(missing_ok=True)
        raise storage_error(disk, f"qemu-img create failed: {proc.stderr.strip()}")


def merge_overlays(top: Path, lower: Path, out: Path) -> None:
    """Write ``out``: one qcow2 overlay with the contents of the two-layer chain ``top`` →
    ``lower`` → (``lower``'s backing file), backed by that backing file (blocking: copies
    ``lower``, points ``top`` at the copy and ``qemu-img commit``s ``top`` into it, which
    copies only ``top``'s allocated clusters). ``top`` is consumed."""
    try:
        copy_sparse(lower, out)
        os.chmod(out, 0o644)
    except OSError as e:
        raise storage_error(out, e) from e
    for args in (
        ["rebase", "-q", "-u", "-F", "qcow2", "-b", str(out.absolute()), str(top)],
        ["commit", "-q", str(top)],
    ):
        proc = subprocess.run([_qemu_img(), *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out.unlink(missing_ok=True)
            raise storage_error(out, f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
    top.unlink(missing_ok=True)


#: Granularity of the zero-page check in :func:`copy_sparse` (the guest's page size).
PAGE = 4096
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE)


def copy_sparse(src: Path, dst: Path, *, skip_zero_pages: bool = False) -> int:
    """Copy ``src`` to a new file ``dst`` keeping holes; returns the bytes written.

    Only the data regions of ``src`` are copied (``SEEK_DATA``/``SEEK_HOLE``; tmpfs and ext4
    report them), with ``copy_file_range`` — which shares blocks instead of copying them on
    file systems that can (XFS, Btrfs). ``skip_zero_pages`` also leaves pages of zeroes out (a
    guest's RAM file has many): they read back as zeroes from the hole. ``dst`` gets ``src``'s
    size and mode 0600.
    """
    written = 0
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fin).st_size
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for start, end in _data_regions(fin, size):
                if skip_zero_pages:
                    written += _copy_nonzero(fin, fout, start, end)
                else:
                    written += _copy_range(fin, fout, start, end)
            os.ftruncate(fout, size)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return written


def _data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    regions: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                return [(pos, size)]
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        regions.append((start, min(end, size)))
        pos = end
    return regions


def _copy_range(fin: int, fout: int, start: int, end: int) -> int:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(fin, fout, end - pos, pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
        if n == 0:  # not supported here (or end of file): plain reads and writes
            data = os.pread(fin, min(_CHUNK, end - pos), pos)
            if not data:
                break
            n = os.pwrite(fout, data, pos)
        pos += n
    return pos - start


def _copy_nonzero(fin: int, fout: int, start: int, end: int) -> int:
    written = 0
    pos = start
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while pos < end:
        n = os.preadv(fin, [view[: min(_CHUNK, end - pos)]], pos)
        if n <= 0:
            break
        chunk = view[:n]
        if n == _CHUNK and chunk == _ZERO_CHUNK:
            pos += n
            continue
        run_start = -1  # start of the current run of non-zero pages within chunk
        for off in range(0, n, PAGE):
            zero = chunk[off : off + PAGE] == _ZERO_PAGE[: min(PAGE, n - off)]
            if not zero and run_start < 0:
                run_start = off
            elif zero and run_start >= 0:
                written += os.pwrite(fout, chunk[run_start:off], pos + run_start)
                run_start = -1
        if run_start >= 0:
            written += os.pwrite(fout, chunk[run_start:n], pos + run_start)
        pos += n
    return written


def allocated_bytes(path: Path) -> int:
    """Bytes a (possibly sparse) file takes on disk."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


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
