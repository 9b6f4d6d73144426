"""Build OCI layer tarballs from a compact spec, for tests.

    layer = write_layer(tmp_path, [
        Dir("etc", mode=0o755),
        File("etc/passwd", b"root:x:0:0::/root:/bin/sh\\n", uid=0, gid=0),
        File("usr/bin/ping", b"ELF", mode=0o4755, xattrs={"security.capability": CAP}),
        Symlink("lib", "usr/lib"),
        Hardlink("usr/bin/ping6", "usr/bin/ping"),
        Device("dev/null", "chr", 1, 3, mode=0o666),
        Fifo("run/fifo"),
        Whiteout("etc/motd"),          # -> etc/.wh.motd
        Opaque("var/cache"),           # -> var/cache/.wh..wh..opq
        Raw(tarinfo, data),            # anything else (hostile headers, odd types)
    ], compression="gzip")
    layer.path, layer.media_type, layer.diff_id, layer.digest

Entries are written in the given order (order matters for tests of whiteouts and hard links), as
PAX by default; xattrs go into ``SCHILY.xattr.*`` records, binary values included.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

MTIME = 1_700_000_000

Compression = Literal["", "gzip", "zstd"]

MEDIA_TYPES: dict[str, str] = {
    "": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class File:
    name: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    name: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Symlink:
    name: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Hardlink:
    name: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME


@dataclass(frozen=True)
class Device:
    name: str
    kind: Literal["chr", "blk"]
    major: int
    minor: int
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Fifo:
    name: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``name`` of lower layers: written as ``dirname/.wh.basename``."""

    name: str


@dataclass(frozen=True)
class Opaque:
    """Hides the lower contents of directory ``dir``: written as ``dir/.wh..wh..opq``."""

    dir: str


@dataclass(frozen=True)
class Raw:
    """A hand-made header (any name, type, size, PAX records) and its data."""

    info: tarfile.TarInfo
    data: bytes | None = None


Entry = File | Dir | Symlink | Hardlink | Device | Fifo | Whiteout | Opaque | Raw


@dataclass(frozen=True)
class Layer:
    path: Path
    media_type: str
    diff_id: str  # sha256 of the uncompressed tar
    digest: str  # sha256 of the blob as written
    compression: str


def _info(
    name: str, kind: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: float = MTIME
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    ti.uname = ti.gname = ""
    return ti


def _with_xattrs(ti: tarfile.TarInfo, xattrs: Mapping[str, bytes]) -> tarfile.TarInfo:
    if xattrs:
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return ti


def tar_bytes(entries: Iterable[Entry], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """The uncompressed tar stream of ``entries``."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for e in entries:
            data: bytes | None = None
            if isinstance(e, File):
                ti = _with_xattrs(
                    _info(
                        e.name, tarfile.REGTYPE, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime
                    ),
                    e.xattrs,
                )
                ti.size = len(e.data)
                data = e.data
            elif isinstance(e, Dir):
                ti = _with_xattrs(
                    _info(
                        e.name, tarfile.DIRTYPE, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime
                    ),
                    e.xattrs,
                )
            elif isinstance(e, Symlink):
                ti = _with_xattrs(
                    _info(e.name, tarfile.SYMTYPE, mode=0o777, uid=e.uid, gid=e.gid, mtime=e.mtime),
                    e.xattrs,
                )
                ti.linkname = e.target
            elif isinstance(e, Hardlink):
                ti = _info(e.name, tarfile.LNKTYPE, uid=e.uid, gid=e.gid, mtime=e.mtime)
                ti.linkname = e.target
            elif isinstance(e, Device):
                kind = tarfile.CHRTYPE if e.kind == "chr" else tarfile.BLKTYPE
                ti = _with_xattrs(
                    _info(e.name, kind, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime), e.xattrs
                )
                ti.devmajor, ti.devminor = e.major, e.minor
            elif isinstance(e, Fifo):
                ti = _with_xattrs(
                    _info(
                        e.name, tarfile.FIFOTYPE, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime
                    ),
                    e.xattrs,
                )
            elif isinstance(e, Whiteout):
                parent, _, base = e.name.rstrip("/").rpartition("/")
                ti = _info(f"{parent}/.wh.{base}" if parent else f".wh.{base}", tarfile.REGTYPE)
            elif isinstance(e, Opaque):
                d = e.dir.strip("/")
                ti = _info(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq", tarfile.REGTYPE)
            else:
                ti, data = e.info, e.data
                if data is not None:
                    ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(
    directory: Path, tar: bytes, compression: str = "", name: str | None = None
) -> Layer:
    """Write an (already built) tar stream as a layer blob named after its digest."""
    blob = compress(tar, compression)
    digest = sha256(blob)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or digest.split(":", 1)[1])
    path.write_bytes(blob)
    return Layer(path, MEDIA_TYPES[compression], sha256(tar), digest, compression)


def write_layer(
    directory: Path,
    entries: Iterable[Entry],
    compression: str = "",
    *,
    name: str | None = None,
    format: int = tarfile.PAX_FORMAT,
) -> Layer:
    """Build a layer from ``entries`` and write its blob into ``directory``."""
    return write_blob(directory, tar_bytes(entries, format=format), compression, name)
