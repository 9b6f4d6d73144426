"""The guest initramfs: the hutch agent as ``/init`` plus the few nodes it needs before any mount.

The archive is an **uncompressed** cpio in the "newc" format (boots ~70 ms faster under TCG than
gzip, and the kernel's ``CONFIG_RD_*`` decompressors are not needed). It is written here in pure
Python instead of with ``cpio``/``gen_init_cpio`` because:

* it is deterministic: fixed inode numbers, uid/gid 0, mtime 0, a fixed order — the same agent
  gives the same bytes, so the archive can be content-keyed and shared between users;
* it needs no root and no ``mknod``: ``/dev/console`` is just a header with rdev 5:1 (the kernel
  opens it for init's stdin/stdout before devtmpfs is mounted, so it must be in the archive);
* the format is ~20 lines (see ``Documentation/driver-api/early-userspace/buffer-format.rst``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hutch.artifacts import hash_inputs

#: Bump when the layout below changes.
INITRAMFS_RECIPE = "hutch-initramfs-1"

_DIRS = ("dev", "proc", "sys", "newroot", "tmp")

#: (name, mode, (major, minor)) of the character devices in the archive.
_CHAR_DEVICES: tuple[tuple[str, int, tuple[int, int]], ...] = (("dev/console", 0o600, (5, 1)),)


def initramfs_key(agent_key: str) -> str:
    """Content key of the initramfs built around the agent whose key is *agent_key*."""
    return hash_inputs([INITRAMFS_RECIPE, agent_key])


def _entry(
    ino: int,
    name: str,
    mode: int,
    data: bytes = b"",
    *,
    nlink: int = 1,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """One newc record: a 110-byte ASCII header, the NUL-terminated name, the data, each
    padded to a multiple of 4 bytes (the header+name together)."""
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        len(data),  # ino mode uid gid nlink mtime filesize
        0,
        0,
        rdev[0],
        rdev[1],  # devmajor devminor rdevmajor rdevminor
        len(encoded),
        0,  # namesize check
    )
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(data) % 4)
    return out


def build_initramfs(agent: bytes) -> bytes:
    """The archive bytes for an agent executable's contents."""
    parts: list[bytes] = []
    ino = 1
    for d in _DIRS:
        parts.append(_entry(ino, d, stat.S_IFDIR | 0o755, nlink=2))
        ino += 1
    for name, perm, rdev in _CHAR_DEVICES:
        parts.append(_entry(ino, name, stat.S_IFCHR | perm, rdev=rdev))
        ino += 1
    parts.append(_entry(ino, "init", stat.S_IFREG | 0o755, agent))
    parts.append(_entry(0, "TRAILER!!!", 0))
    blob = b"".join(parts)
    return blob + b"\0" * (-len(blob) % 512)  # cpio convention; the kernel ignores the zeros


def write_initramfs(agent_binary: Path, out: Path) -> None:
    """Write the initramfs with *agent_binary* as ``/init`` to *out* (atomically)."""
    blob = build_initramfs(agent_binary.read_bytes())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(blob)
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
