"""Apply OCI image layers (tar, tar+gzip, tar+zstd) onto a directory tree, safely.

One layer at a time, streaming: the blob is decompressed and parsed by :mod:`tarfile` from a
forward-only stream (:class:`_TarStream`; file data goes from its buffer straight to the files),
never loaded into memory, while the sha256 of the *uncompressed* stream (the layer's ``diff_id``)
is computed on the way. Full OCI semantics:

* whiteouts: ``D/.wh.NAME`` deletes ``D/NAME`` (file, symlink or whole tree) of lower layers;
  ``D/.wh..wh..opq`` (opaque) empties ``D`` of lower-layer contents but keeps what *this* layer puts
  there, wherever the marker sits in the tar (before or after its siblings: every path this layer
  creates is remembered, and the purge skips them). Other ``.wh..wh.*`` names (AUFS bookkeeping) are
  ignored. Per the spec a whiteout never hides an entry of its own layer.
* any type replaces any other (dir↔file↔symlink↔device, both ways): an existing non-directory is
  unlinked (never written through, so other hard links to it keep their data); an existing directory
  is kept when the entry is a directory (its metadata is updated) and removed otherwise.
* hard links (to files of this or lower layers, also to a file this layer replaced earlier), symlinks
  (targets stored verbatim), character/block devices and fifos (``mknod``), numeric ownership
  (``lchown``), modes incl. setuid/setgid/sticky (set *after* the chown, which clears setuid), mtimes
  (directories' at the end of the layer, as adding children changes them), and xattrs from PAX
  ``SCHILY.xattr.*`` / ``LIBARCHIVE.xattr.*`` records (``security.*``, ``system.posix_acl_*``,
  ``trusted.*``, ``user.*``).

Ownership, devices and privileged xattrs need root: the caller runs this inside ``fakeroot`` (see
:mod:`hutch.images.rootfs`). Given a :class:`TreeMeta`, the applier also writes down, for every
path it creates, the metadata the image wants there (type, mode, owner, device number, xattrs)
— what the fakeroot session reports, without asking it (each question is a round trip to
``faked``) — so that ``mkfs.ext4 -d`` can run *outside* fakeroot and the real tree's
approximations (the calling user's ownership, devices as empty files, no privileged xattrs) be
corrected in the image afterwards.

Hostile input
-------------
The layer is untrusted. Nothing may be created, modified or read outside ``root``. The policy,
per case, follows what container runtimes (containerd's ``RootPath``/``securejoin``) do, and
otherwise rejects with :class:`ImageError` naming the layer and the entry:

* entry names are split on ``/``; empty and ``.`` components are dropped, so an absolute name
  (``/etc/x``) is taken relative to the root, like GNU tar and the runtimes do. A ``..`` component
  anywhere → **rejected** (no tool writes one; it only serves escapes). NUL bytes, names longer than
  ``max_name`` bytes or with a component over 255 bytes → rejected.
* the *parent* of every entry is resolved **inside the root with chroot semantics**, one component
  at a time, with ``lstat``/``readlink`` on the host and never letting the host kernel follow a
  symlink: a symlinked component is replaced by its target, an absolute target restarts at the
  root, ``..`` stops at the root. So ``usr/lib/x`` through ``lib -> usr/lib`` (Debian's merged /usr)
  lands in ``usr/lib/x``; ``lib -> /etc`` makes ``lib/x`` land in ``ROOT/etc/x``; ``evil -> ../../..``
  makes ``evil/x`` land in ``ROOT/x`` — exactly where the guest, whose ``/`` is ``root``, will look.
  More than 40 symlinks or 1024 path components in one resolution → rejected (loop, or a
  CPU-burning chain). A parent that is an existing non-directory → rejected. Missing parents are
  created (``0755 root:root``).
* the *final* component is never followed: files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``
  after unlinking whatever was there; directories, symlinks and links with calls that fail on an
  existing name (which is then removed, never followed, and the call retried); device nodes and
  fifos only after removing whatever had the name — fakeroot emulates ``mknod`` with
  ``open(O_CREAT|O_TRUNC)``, which *would* follow a symlink and truncate its target (a test
  caught exactly that); metadata calls use the fd or ``follow_symlinks=False``.
* hard-link targets are resolved the same way (parent inside the root, last component not
  followed; ``link()`` without ``AT_SYMLINK_FOLLOW``), so they can only name inodes already inside
  the root; a missing target or a directory target → rejected.
* symlink targets are data, stored verbatim (the guest resolves them inside its own root); a target
  longer than 4095 bytes or containing NUL → rejected.
* decompression bombs and endless streams: every uncompressed byte (including PAX headers and
  trailing padding, which the diff_id covers) is charged to a :class:`LayerBudget` shared by all the
  layers of an image, checked against :class:`LayerLimits` (total bytes, entry count). A file whose
  declared size exceeds the remaining budget is rejected before reading it. PAX / GNU long-name
  headers are capped at 1 MiB each and 8 in a row (tarfile would otherwise read them into memory).
  ``tarfile``'s member list is cleared as we go (it keeps every ``TarInfo`` otherwise).
* duplicate entries: the later one wins (tar semantics). A corrupt header mid-stream is an error
  (``tarfile`` alone would silently stop there).
* GNU sparse files are **rejected** (no OCI tool writes them; a 16 TiB hole costs 512 bytes of tar and
  tarfile would expand it into zeros); contiguous files (type ``7``) are regular files; GNU volume
  headers are skipped; any other type → rejected.
* xattrs: only the namespaces above are applied; ``user.*`` is skipped on symlinks, devices and
  fifos (Linux allows it only on files and directories), ``system.posix_acl_default`` on
  non-directories; those skips are reported as warnings. A malformed ACL, a name over 255 bytes, or
  more xattr data than an ext4 inode can hold → rejected.

Why not ``tarfile.extractall``: it follows symlinks in parent paths on the host (the classic
escape), and its ``filter='data'`` — the only safe filter — drops exactly what a root filesystem
needs (device nodes, setuid bits, ownership, absolute symlinks). Races are not a concern: the tree
lives in a private temporary directory only this process writes.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard

from hutch.errors import HutchError, ImageError, SetupError, StorageError
from hutch.images.oci import LAYER_COMPRESSION

__all__ = [
    "LayerBudget",
    "LayerLimits",
    "TreeMeta",
    "Wanted",
    "apply_layer",
    "ensure_dirs",
    "write_file",
]

_CHUNK = 1 << 20  # read/write granularity of the layer stream
_MAX_META_BYTES = 1 << 20  # one PAX extended header or GNU long name/link
_MAX_META_CHAIN = 8  # extended headers in a row before a real member
_MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS
_MAX_RESOLVE_STEPS = 1024  # path components visited in one resolution (symlink bodies included)
_NAME_MAX = 255
_LINK_MAX = 4095  # PATH_MAX - 1: the longest symlink target Linux stores
_XATTR_NAME_MAX = 255
_XATTR_VALUE_MAX = 65536
#: ext4 keeps all xattrs of an inode in the inode's spare bytes plus one 4 KiB block (mke2fs does
#: not enable ``ea_inode``); the per-entry cost is 16 bytes of header + name + value, each padded.
_XATTR_EXT4_BUDGET = 4096 - 32
_PROGRESS_EVERY = 256 << 20
_MAX_WARNINGS = 50

_WH = ".wh."
_WH_META = ".wh..wh."
_WH_OPAQUE = ".wh..wh..opq"

_REG_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_META_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_GNU_VOLHDR = b"V"
#: What tarfile raises for a zero block / the end of the stream (the regular end of an archive).
_END_OF_ARCHIVE: tuple[type[Exception], ...] = (
    tarfile.EOFHeaderError,  # type: ignore[attr-defined]
    tarfile.EmptyHeaderError,  # type: ignore[attr-defined]
)

_XATTR_PREFIXES = ("user.", "trusted.", "security.")
_XATTR_ACLS = ("system.posix_acl_access", "system.posix_acl_default")

_HINT_BAD = (
    "The image layer is malformed or built to attack the host, and was refused. "
    "Rebuild the image, or pull it from a source you trust."
)


@dataclass(frozen=True)
class LayerLimits:
    """Bounds on untrusted layers, against decompression bombs and endless streams."""

    #: Total uncompressed tar bytes across all the layers of one image.
    max_bytes: int = 64 << 30
    #: Total tar entries across all layers (headers of files, dirs, links, whiteouts...).
    max_entries: int = 2_000_000
    #: Longest entry name / hard-link target, in bytes.
    max_name: int = 4096


@dataclass
class LayerBudget:
    """What the layers of one image have used so far; pass the same object for every layer."""

    bytes_used: int = 0
    entries_used: int = 0
    #: Things skipped on purpose (first few; ``warning_count`` has the total).
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0

    def warn(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)


#: What the image wants for one inode: (st_mode incl. the file type bits, uid, gid, st_rdev,
#: xattrs as sorted (name, value) pairs). Hard links share the same tuple.
Wanted = tuple[int, int, int, int, tuple[tuple[str, bytes], ...]]


@dataclass
class TreeMeta:
    """The metadata the image wants for every path of the tree, written by the applier as it goes
    (no stat/getxattr calls: under fakeroot each is a round trip to ``faked``).

    ``entries`` maps a root-relative key (``"a/b"``, ``""`` = the root; components as decoded by
    ``os.fsdecode``) to its :data:`Wanted`. Pass the same object for every layer, the extra
    files and the boot directories. Keys of deleted paths are not removed (that would cost a scan
    per deleted directory): a path that exists at the end always has the record its last creation
    wrote, so look records up only for paths found in the tree. A path with no record was not
    made by the applier (e.g. a hard link to something it did not record): treat the record as
    unusable for it.
    """

    entries: dict[str, Wanted] = field(default_factory=dict)


class _Refused(Exception):
    """The layer is invalid; carries the reason (the entry is added by the caller)."""


class _Reader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


# --- tar parsing hardening ------------------------------------------------------------------
class _SafeTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized metadata headers and sparse files, and that reports a corrupt
    header instead of letting tarfile treat it as the end of the archive."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _SafeTarInfo:
        try:
            return super().frombuf(buf, encoding, errors)
        except _END_OF_ARCHIVE:
            raise  # a zero block or the end of the stream: the regular end of the archive
        except tarfile.HeaderError as e:
            raise _Refused(f"corrupt tar header ({e})") from None

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused("GNU sparse files are not supported")
        if self.type not in _META_TYPES:
            return super()._proc_member(tf)  # type: ignore[misc, no-any-return]
        if self.size > _MAX_META_BYTES:
            raise _Refused(f"extended header of {self.size} bytes (limit {_MAX_META_BYTES})")
        depth: int = tf.__dict__.get("_hutch_meta_depth", 0)
        if depth >= _MAX_META_CHAIN:
            raise _Refused(f"more than {_MAX_META_CHAIN} extended headers in a row")
        tf.__dict__["_hutch_meta_depth"] = depth + 1
        try:
            return super()._proc_member(tf)  # type: ignore[misc, no-any-return]
        finally:
            tf.__dict__["_hutch_meta_depth"] = depth

    # PAX sparse formats 0.0, 0.1 and 1.0 (the last reads an unbounded map from the data).
    def _proc_gnusparse_00(self, *args: object) -> None:
        raise _Refused("GNU sparse files are not supported")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


class _TarStream:
    """The uncompressed layer stream as ``tarfile`` sees it: a forward-only file.

    Hashes every byte (the diff_id), charges it to the budget, maps codec errors, and serves
    ``read``/``tell``/forward ``seek`` from one chunk buffer without re-copying it (tarfile's own
    stream class slices its whole buffer on every 512-byte header read). File data bypasses
    tarfile altogether: :meth:`copy_to` writes it from the buffer straight to the file.
    """

    def __init__(
        self,
        src: _Reader,
        budget: LayerBudget,
        limits: LayerLimits,
        progress: Callable[[int], None] | None,
    ) -> None:
        self._src = src
        self._budget = budget
        self._limits = limits
        self._progress = progress
        self._next_report = _PROGRESS_EVERY
        self.sha = hashlib.sha256()
        self.count = 0  # bytes pulled from the source
        self._buf = b""
        self._off = 0  # unread data is self._buf[self._off:]
        self._pos = 0  # stream offset of self._buf[self._off]

    def _pull(self) -> bytes:
        try:
            data = self._src.read(_CHUNK)
        except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
            raise _Refused(f"corrupt compressed stream ({e})") from None
        if data:
            n = len(data)
            self.count += n
            self._budget.bytes_used += n
            if self._budget.bytes_used > self._limits.max_bytes:
                raise _Refused(
                    f"the image unpacks to more than {_fmt_bytes(self._limits.max_bytes)} "
                    "(decompression bomb or endless stream?)"
                )
            self.sha.update(data)
            if self._progress is not None and self.count >= self._next_report:
                self._next_report += _PROGRESS_EVERY
                self._progress(self.count)
        return data

    def _refill(self) -> bool:
        """Replace the (fully consumed) buffer with the next chunk; False at the end."""
        data = self._pull()
        self._buf, self._off = data, 0
        return bool(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("unbounded read")
        avail = len(self._buf) - self._off
        if size <= avail:
            out = self._buf[self._off : self._off + size]
            self._off += size
            self._pos += size
            return out
        parts = [self._buf[self._off :]]
        got = avail
        while got < size and self._refill():
            take = min(size - got, len(self._buf))
            parts.append(self._buf if take == len(self._buf) else self._buf[:take])
            self._off = take
            got += take
        if got < size:
            self._buf, self._off = b"", 0
        self._pos += got
        return b"".join(parts)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._pos:
            raise _Refused("the tar stream would need a backward seek")
        skip = offset - self._pos
        while skip:
            avail = len(self._buf) - self._off
            if not avail:
                if not self._refill():
                    break  # at the end: the next read returns b"", tarfile reports it
                continue
            step = min(avail, skip)
            self._off += step
            self._pos += step
            skip -= step
        return self._pos

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes of the stream to ``fd``."""
        while size:
            avail = len(self._buf) - self._off
            if not avail:
                if not self._refill():
                    raise _Refused("unexpected end of data")
                continue
            step = min(avail, size)
            _write_all(fd, memoryview(self._buf)[self._off : self._off + step])
            self._off += step
            self._pos += step
            size -= step

    def drain(self) -> None:
        """Read to the end (padding after the tar's end blocks is part of the diff_id)."""
        self._buf, self._off = b"", 0
        while self._pull():
            pass


def _decompressor(raw: IO[bytes], compression: str) -> _Reader:
    if compression == "":
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        reader: _Reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=_CHUNK, read_across_frames=True
        )
        return reader
    raise ImageError(f"unsupported layer compression {compression!r}")


def _fmt_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --- the applier ----------------------------------------------------------------------------
class _Applier:
    """Applies the entries of one layer onto ``root`` (a directory we own exclusively)."""

    def __init__(
        self,
        root: Path,
        label: str,
        limits: LayerLimits,
        budget: LayerBudget,
        meta: TreeMeta | None = None,
    ) -> None:
        self.meta = meta.entries if meta is not None else None
        self.root = os.fspath(root).rstrip("/") or "/"
        try:
            st = os.lstat(self.root)
        except OSError as e:
            raise StorageError(f"layer target {root} is not usable: {e.strerror}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"layer target {root} is not a directory")
        self.label = label
        self.limits = limits
        self.budget = budget
        self.current = ""  # name of the entry being applied, for messages
        #: keys (root-relative paths, "" = root) known to be real directories right now
        self._dirs: set[str] = {""}
        #: entry parent paths that went through symlinks → their resolved keys
        self._resolved: dict[str, str] = {}
        #: directories whose lower contents are already gone (opaque), this layer
        self._purged: set[str] = set()
        #: every path this layer created, and their ancestors (for opaque whiteouts)
        self._created: set[str] = set()
        self._ancestors: set[str] = {""}
        #: directories whose mode and mtime are set at the end: (key, mode, mtime ns, removals)
        self._deferred: list[tuple[str, int, int, int]] = []
        #: key -> index in _deferred of the entry that applies to the directory there now (the
        #: last one; none if the directory was since deleted and made again implicitly)
        self._deferred_last: dict[str, int] = {}
        self._removals = 0  # bumped whenever something is deleted (keys may change meaning)

    def record(
        self,
        key: str,
        mode: int,
        owner: tuple[int, int] = (0, 0),
        rdev: int = 0,
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        """Write down what the image wants at ``key`` (``mode`` includes the file type)."""
        if self.meta is not None:
            xa = tuple(sorted(xattrs.items())) if xattrs else ()
            self.meta[key] = (mode, owner[0], owner[1], rdev, xa)

    # -- paths --
    def host(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def split(self, name: str, what: str = "name") -> list[str]:
        if "\x00" in name:
            raise _Refused(f"{what} contains a NUL byte")
        # (A str char is at most 4 bytes once encoded: only long names need encoding.)
        if len(name) * 4 > self.limits.max_name and len(os.fsencode(name)) > self.limits.max_name:
            raise _Refused(f"{what} is longer than {self.limits.max_name} bytes")
        parts = [p for p in name.split("/") if p and p != "."]
        if ".." in parts:
            raise _Refused(f"{what} contains a '..' component")
        for p in parts:
            if len(p) * 4 > _NAME_MAX and len(os.fsencode(p)) > _NAME_MAX:
                raise _Refused(f"{what} has a component longer than {_NAME_MAX} bytes")
        return parts

    def resolve_dir(self, parts: list[str], *, create: bool) -> str | None:
        """Resolve ``parts`` to the key of a real directory inside the root (chroot semantics:
        symlinks are followed *within* the root, ``..`` stops at the root). Missing components
        are created if ``create``, else None is returned; so is a non-directory when not
        ``create`` (with ``create`` it is an error)."""
        key = "/".join(parts)
        if key in self._dirs:
            return key
        known = self._resolved.get(key)
        if known is not None:
            return known
        cur = ""  # the resolved key so far (a real directory)
        pending = parts[::-1]
        hops = steps = 0
        while pending:
            comp = pending.pop()
            steps += 1
            if steps > _MAX_RESOLVE_STEPS:
                raise _Refused(f"resolving the path takes more than {_MAX_RESOLVE_STEPS} steps")
            if comp in ("", "."):
                continue
            if comp == "..":
                cur = cur.rpartition("/")[0]
                continue
            cand = f"{cur}/{comp}" if cur else comp
            if cand in self._dirs:
                cur = cand
                continue
            path = self.host(cand)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                self._mkdir_implicit(cand)
                cur = cand
                continue
            if stat.S_ISDIR(st.st_mode):
                self._dirs.add(cand)
                cur = cand
            elif stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise _Refused(f"too many levels of symbolic links at /{cand}")
                target = os.readlink(path)
                if target.startswith("/"):
                    cur = ""
                pending.extend(target.split("/")[::-1])
            else:
                if not create:
                    return None
                raise _Refused(f"parent /{cand} is not a directory")
        if hops:
            self._resolved[key] = cur
        return cur

    def _mkdir_implicit(self, key: str) -> None:
        path = self.host(key)
        os.mkdir(path, 0o755)
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, 0o755)
        self._dirs.add(key)
        self._deferred_last.pop(key, None)  # a Dir entry of this layer made another directory
        self.record(key, stat.S_IFDIR | 0o755)

    def _mark(self, key: str) -> None:
        self._created.add(key)
        parent = key.rpartition("/")[0]
        while parent not in self._ancestors:
            self._ancestors.add(parent)
            parent = parent.rpartition("/")[0]

    def remove(self, key: str) -> bool:
        """Delete whatever is at ``key`` (never following a symlink); False if nothing was."""
        path = self.host(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if not key:
                raise _Refused("cannot replace the root directory")
            shutil.rmtree(path)  # fd-based on Linux: never follows symlinks inside
            self._dirs = {""}
        else:
            os.unlink(path)
        self._resolved.clear()
        self._removals += 1
        return True

    def purge_lower(self, top: str) -> None:
        """Opaque directory: delete everything under ``top`` that this layer did not create."""
        probe = top
        while True:  # already done for it or a parent in this layer: nothing lower is left
            if probe in self._purged:
                return
            if not probe:
                break
            probe = probe.rpartition("/")[0]
        self._purged.add(top)
        stack = [top]
        while stack:
            dkey = stack.pop()
            with os.scandir(self.host(dkey)) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for name, is_dir in children:
                key = f"{dkey}/{name}" if dkey else name
                if key in self._created or key in self._ancestors:
                    if is_dir:
                        stack.append(key)
                else:
                    self.remove(key)

    # -- entries --
    def apply(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        self.current = ti.name
        budget, limits = self.budget, self.limits
        budget.entries_used += 1
        if budget.entries_used > limits.max_entries:
            raise _Refused(f"the image has more than {limits.max_entries} entries")
        parts = self.split(ti.name)
        if not parts:  # the root itself ("./")
            if not ti.isdir():
                raise _Refused("the root of the layer is not a directory")
            self._dir("", ti, existed=True)
            return
        base = parts[-1]
        if base.startswith(_WH):
            self._whiteout(parts[:-1], base)
            return
        parent = self.resolve_dir(parts[:-1], create=True)
        assert parent is not None
        key = f"{parent}/{base}" if parent else base
        t = ti.type
        if t in _REG_TYPES:
            self._file(tf, ti, key)
        elif t == tarfile.DIRTYPE:
            self._dir(key, ti, existed=False)
        elif t == tarfile.SYMTYPE:
            self._symlink(ti, key)
        elif t == tarfile.LNKTYPE:
            self._hardlink(ti, key)
        elif t in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            self._node(ti, key)
        elif t == _GNU_VOLHDR:
            budget.warn(f"{self.label}: skipped GNU volume header {ti.name!r}")
            return
        else:
            raise _Refused(f"unsupported tar entry type {t!r}")
        self._mark(key)

    def _whiteout(self, parent_parts: list[str], base: str) -> None:
        parent = self.resolve_dir(parent_parts, create=False)
        if parent is None:
            return  # nothing there to hide
        if base == _WH_OPAQUE:
            self.purge_lower(parent)
            return
        if base.startswith(_WH_META):
            return  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs...): no meaning for us
        name = base[len(_WH) :]
        if name in ("", ".", ".."):
            raise _Refused("whiteout of an invalid name")
        key = f"{parent}/{name}" if parent else name
        if key in self._created or key in self._ancestors:
            # Whiteouts hide lower layers only. If this layer made a directory there, what the
            # whiteout hides is the lower directory's contents.
            try:
                is_dir = stat.S_ISDIR(os.lstat(self.host(key)).st_mode)
            except FileNotFoundError:
                is_dir = False
            if is_dir:
                self.purge_lower(key)
            return
        self.remove(key)

    def _create(self, key: str, make: Callable[[str], Any]) -> Any:
        """Run ``make(path)`` (which fails with FileExistsError if the name exists); on a clash
        delete the existing entry and retry once."""
        path = self.host(key)
        try:
            return make(path)
        except FileExistsError:
            self.remove(key)
            return make(path)

    def _file(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, key: str) -> None:
        remaining = self.limits.max_bytes - self.budget.bytes_used
        if ti.size > remaining:
            raise _Refused(
                f"file of {_fmt_bytes(ti.size)} exceeds the image size limit "
                f"({_fmt_bytes(self.limits.max_bytes)})"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        mode = ti.mode & 0o7777
        # Plain modes the umask leaves alone are given at creation, saving a chmod (an IPC
        # round trip under fakeroot). Modes without u+rw are not: mkfs, as the real user under
        # fakeroot, must still read the file (fakeroot's chmod keeps u+rw on the real file).
        direct = mode & 0o7600 == 0o600 and mode & _umask() == 0
        xattrs = self._wanted_xattrs(ti, "file")
        owner = self._owner(ti)
        fd: int = self._create(key, lambda p: os.open(p, flags, mode if direct else 0o600))
        try:
            if ti.size:
                # tarfile left the stream at the member's data (offset_data); copy it
                # straight from the stream's buffer, bypassing tarfile's file object.
                stream = cast(_TarStream, tf.fileobj)
                if stream.tell() != ti.offset_data:
                    raise _Refused("data not where the header says")
                stream.copy_to(fd, ti.size)
            if owner != (0, 0) or xattrs or not _unknown_is_root():
                os.fchown(fd, *owner)
            for name, value in xattrs.items():
                os.setxattr(fd, name, value)
            if not direct:
                os.fchmod(fd, mode)  # after the chown, which clears setuid/setgid
            ns = self._mtime_ns(ti)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)
        self.record(key, stat.S_IFREG | mode, owner, 0, xattrs)

    def _dir(self, key: str, ti: tarfile.TarInfo, *, existed: bool) -> None:
        path = self.host(key)
        if not existed:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    existed = True
                else:
                    self.remove(key)
                    os.mkdir(path, 0o700)
        owner = self._owner(ti)
        os.chown(path, *owner, follow_symlinks=False)
        wanted = self._wanted_xattrs(ti, "dir")
        if existed:  # the entry's xattrs replace those of the lower directory
            for name in os.listxattr(path, follow_symlinks=False):
                if name not in wanted:
                    os.removexattr(path, name, follow_symlinks=False)
        self._set_xattrs(path, wanted)
        self._dirs.add(key)
        # The mode is set in finish() (where the last entry for a path wins, as here).
        self._deferred_last[key] = len(self._deferred)
        self._deferred.append((key, ti.mode & 0o7777, self._mtime_ns(ti), self._removals))
        self.record(key, stat.S_IFDIR | (ti.mode & 0o7777), owner, 0, wanted)

    def _symlink(self, ti: tarfile.TarInfo, key: str) -> None:
        target = ti.linkname
        if "\x00" in target:
            raise _Refused("symlink target contains a NUL byte")
        if not target or len(os.fsencode(target)) > _LINK_MAX:
            raise _Refused("symlink target is empty or longer than 4095 bytes")

        def make(p: str) -> str:
            os.symlink(target, p)
            return p

        path: str = self._create(key, make)
        xattrs = self._wanted_xattrs(ti, "symlink")
        owner = self._owner(ti)
        if owner != (0, 0) or xattrs or not _unknown_is_root():
            os.chown(path, *owner, follow_symlinks=False)
        self._set_xattrs(path, xattrs)
        ns = self._mtime_ns(ti)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
        self.record(key, stat.S_IFLNK | 0o777, owner, 0, xattrs)

    def _hardlink(self, ti: tarfile.TarInfo, key: str) -> None:
        tparts = self.split(ti.linkname, "hard link target")
        if not tparts:
            raise _Refused("hard link to the root directory")
        tparent = self.resolve_dir(tparts[:-1], create=False)
        if tparent is None:
            raise _Refused(f"hard link target {ti.linkname!r} does not exist")
        tkey = f"{tparent}/{tparts[-1]}" if tparent else tparts[-1]
        if tkey == key:
            return  # a link to itself: nothing to do
        if self.meta is not None:  # the new name shares the target's inode, so its metadata
            wanted = self.meta.get(tkey)
            if wanted is not None:
                self.meta[key] = wanted
            else:
                self.meta.pop(key, None)  # unknown: no record is better than a stale one
        src, dst = self.host(tkey), self.host(key)
        try:
            tst = os.lstat(src)
        except FileNotFoundError:
            raise _Refused(f"hard link target {ti.linkname!r} does not exist") from None
        if stat.S_ISDIR(tst.st_mode):
            raise _Refused(f"hard link target {ti.linkname!r} is a directory")
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            dst_st = os.lstat(dst)
            if (dst_st.st_dev, dst_st.st_ino) == (tst.st_dev, tst.st_ino):
                return  # already that inode
            self.remove(key)
            try:
                os.link(src, dst, follow_symlinks=False)
            except FileNotFoundError:  # the target was inside what we just removed
                raise _Refused(f"hard link target {ti.linkname!r} does not exist") from None

    def _node(self, ti: tarfile.TarInfo, key: str) -> None:
        if ti.type == tarfile.FIFOTYPE:
            kind, dev = stat.S_IFIFO, 0
        else:
            if not (0 <= ti.devmajor < 1 << 12 and 0 <= ti.devminor < 1 << 20):
                raise _Refused(f"device number {ti.devmajor}:{ti.devminor} out of range")
            kind = stat.S_IFCHR if ti.type == tarfile.CHRTYPE else stat.S_IFBLK
            dev = os.makedev(ti.devmajor, ti.devminor)

        # Never let mknod meet an existing name: fakeroot emulates mknod with
        # open(O_CREAT|O_TRUNC), which follows a symlink there and truncates its target.
        self.remove(key)
        path = self.host(key)
        os.mknod(path, kind | 0o600, dev)
        if stat.S_ISLNK(os.lstat(path).st_mode):  # cannot happen; never chmod through one
            raise _Refused("device node creation raced with a symlink")
        owner = self._owner(ti)
        os.chown(path, *owner, follow_symlinks=False)
        xattrs = self._wanted_xattrs(ti, "node")
        self._set_xattrs(path, xattrs)
        os.chmod(path, ti.mode & 0o7777)  # a node we just made, not a symlink
        ns = self._mtime_ns(ti)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
        self.record(key, kind | (ti.mode & 0o7777), owner, dev, xattrs)

    # -- metadata --
    @staticmethod
    def _owner(ti: tarfile.TarInfo) -> tuple[int, int]:
        uid, gid = ti.uid, ti.gid
        # (uid_t)-1 means "leave unchanged" to chown(): refuse it rather than silently keep 0.
        if not (0 <= uid < 0xFFFFFFFF and 0 <= gid < 0xFFFFFFFF):
            raise _Refused(f"owner {uid}:{gid} out of range")
        return uid, gid

    @staticmethod
    def _mtime_ns(ti: tarfile.TarInfo) -> int:
        # ext4 with 256-byte inodes stores 1901..2446; clamp so os.utime can't overflow.
        mtime = min(max(float(ti.mtime), -(2.0**31)), 2.0**34 - 1)
        return int(mtime * 1_000_000_000)

    def _wanted_xattrs(self, ti: tarfile.TarInfo, kind: str) -> dict[str, bytes]:
        headers = ti.pax_headers
        if not headers:
            return {}
        found: dict[str, bytes] = {}
        for k, v in headers.items():
            if k.startswith("SCHILY.xattr."):
                name = k[len("SCHILY.xattr.") :]
                value = v.encode("utf-8", "surrogateescape")
            elif k.startswith("LIBARCHIVE.xattr."):
                name = urllib.parse.unquote(k[len("LIBARCHIVE.xattr.") :], errors="surrogateescape")
                try:
                    value = base64.b64decode(v.encode("ascii", "surrogateescape"), validate=False)
                except (binascii.Error, ValueError):
                    raise _Refused(f"xattr {name!r} has an invalid base64 value") from None
            else:
                continue
            if not (name.startswith(_XATTR_PREFIXES) or name in _XATTR_ACLS):
                self.budget.warn(f"{self.label}: {self.current!r}: skipped xattr {name!r}")
                continue
            if name.startswith("user.") and kind not in ("file", "dir"):
                self.budget.warn(
                    f"{self.label}: {self.current!r}: skipped {name!r} (user.* xattrs exist "
                    f"only on files and directories)"
                )
                continue
            if name == "system.posix_acl_default" and kind != "dir":
                self.budget.warn(f"{self.label}: {self.current!r}: skipped default ACL")
                continue
            if "\x00" in name or len(os.fsencode(name)) > _XATTR_NAME_MAX:
                raise _Refused("xattr name is invalid or too long")
            if len(value) > _XATTR_VALUE_MAX:
                raise _Refused(f"xattr {name!r} is larger than {_XATTR_VALUE_MAX} bytes")
            if name in _XATTR_ACLS and not _valid_acl(value):
                raise _Refused(f"xattr {name!r} is not a valid POSIX ACL")
            found[name] = value
        if found:
            cost = sum(16 + _pad4(len(os.fsencode(n))) + _pad4(len(v)) for n, v in found.items())
            if cost > _XATTR_EXT4_BUDGET:
                raise _Refused(f"xattrs take {cost} bytes; ext4 holds about 4 KiB per inode")
        return found

    @staticmethod
    def _set_xattrs(path: str, xattrs: dict[str, bytes]) -> None:
        for name, value in xattrs.items():
            os.setxattr(path, name, value, follow_symlinks=False)

    def finish(self) -> None:
        """Set directory modes and mtimes, children first; the last entry for a path wins, and
        none if that directory was deleted and the path made a directory again implicitly."""
        for i in range(len(self._deferred) - 1, -1, -1):
            key, mode, ns, removals = self._deferred[i]
            if self._deferred_last.get(key) != i:
                continue
            path = self.host(key)
            if removals != self._removals:  # something was deleted since: check it's still a dir
                try:
                    if not stat.S_ISDIR(os.lstat(path).st_mode):
                        continue
                except FileNotFoundError:
                    continue
            os.chmod(path, mode)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)


@functools.cache
def _unknown_is_root() -> bool:
    """Inside a fakeroot session that reports files it never saw as 0:0 (its default mode):
    then a file or symlink made by open()/symlink() (which fakeroot does not intercept) already
    looks root-owned, and chowning it to 0:0 is an IPC round trip for nothing. (Not when it
    gets xattrs: fakeroot records those with the *real* owner unless chowned first.)"""
    return "FAKEROOTKEY" in os.environ and os.environ.get("FAKED_MODE") == "unknown-is-root"


@functools.cache
def _umask() -> int:
    """The process umask, read without changing it (-1 = unknown: never rely on it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _valid_acl(value: bytes) -> bool:
    """The Linux xattr form of a POSIX ACL: version 2, then 8-byte (tag, perm, id) entries."""
    return (
        len(value) >= 4 and (len(value) - 4) % 8 == 0 and int.from_bytes(value[:4], "little") == 2
    )


# --- public entry points --------------------------------------------------------------------
def apply_layer(
    blob: Path,
    media_type: str,
    root: Path,
    *,
    expect_diff_id: str | None,
    limits: LayerLimits,
    budget: LayerBudget,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
    meta: TreeMeta | None = None,
) -> str:
    """Apply the layer in ``blob`` onto the directory ``root``; return its ``sha256:`` diff_id.

    ``media_type`` picks the decompressor (:data:`hutch.images.oci.LAYER_COMPRESSION`).
    ``expect_diff_id``: if given and the uncompressed stream hashes differently → ImageError
    (the layer has been applied by then; the caller discards the tree). ``budget`` accumulates
    across the layers of one image and is checked against ``limits``. ``name`` (default: the
    blob's file name) identifies the layer in errors; ``progress`` is called with the
    uncompressed byte count every 256 MiB. ``meta``: if given, receives what the image wants for
    every path the layer creates (pass the same object for every layer of an image).

    Raises ImageError (bad or hostile layer), StorageError (ENOSPC and such on ``root``),
    SetupError (ownership refused: not running under fakeroot or as root).
    """
    label = name or blob.name
    compression = LAYER_COMPRESSION.get(media_type)
    if compression is None:
        raise ImageError(
            f"layer {label}: unsupported media type {media_type!r}",
            hint="hutch reads tar layers, plain, gzip or zstd compressed.",
        )
    applier = _Applier(root, label, limits, budget, meta)
    try:
        raw = open(blob, "rb", buffering=_CHUNK)  # noqa: SIM115 (closed in finally)
    except OSError as e:
        raise ImageError(
            f"layer {label}: cannot read blob {blob}: {e.strerror}",
            hint="The image cache is damaged; pull the image again.",
        ) from e
    try:
        reader = _TarStream(_decompressor(raw, compression), budget, limits, progress)
        try:
            # TarFile on our forward-only stream rather than tarfile.open(mode="r|"): same
            # sequential reading, without tarfile's _Stream copies (see _TarStream).
            with tarfile.TarFile(
                fileobj=cast(IO[bytes], reader),
                mode="r",
                tarinfo=_SafeTarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tf:
                while True:
                    ti = tf.next()
                    if ti is None:
                        break
                    tf.members.clear()  # type: ignore[attr-defined]  # (else kept forever)
                    applier.apply(tf, ti)
            applier.current = ""
            applier.finish()
            reader.drain()
        except _Refused as e:
            raise _image_error(label, applier.current, str(e)) from None
        except tarfile.TarError as e:
            raise _image_error(label, applier.current, f"invalid tar stream ({e})") from None
        except RecursionError:
            raise _image_error(label, applier.current, "headers nested too deeply") from None
        except HutchError:
            raise
        except OSError as e:
            raise _os_error(e, label, applier.current, root) from e
    finally:
        raw.close()
    diff_id = "sha256:" + reader.sha.hexdigest()
    if expect_diff_id is not None and diff_id != expect_diff_id:
        raise ImageError(
            f"layer {label}: its uncompressed content hashes to {diff_id}, but the image "
            f"config says diff_id {expect_diff_id}",
            hint="The layer blob is corrupt or was tampered with; remove it from the cache and "
            "pull the image again.",
        )
    return diff_id


def _image_error(label: str, entry: str, reason: str) -> ImageError:
    where = f"layer {label}, entry {entry!r}" if entry else f"layer {label}"
    return ImageError(f"{where}: {reason}", hint=_HINT_BAD)


def free_space_note(path: Path | str) -> str:
    """``"; N MiB free on P"`` for the filesystem holding ``path`` (or "" if unknown)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"; {shutil.disk_usage(probe).free >> 20} MiB free on {probe}"
    except OSError:
        return ""


def _os_error(e: OSError, label: str, entry: str, root: Path) -> HutchError:
    what = f"layer {label}, entry {entry!r}" if entry else f"layer {label}"
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"{what}: writing into {root} failed: {reason}{free_space_note(root)}",
            hint="Free space there, or give the image a scratch directory on a bigger disk.",
        )
    if e.errno in (errno.EROFS, errno.EIO):
        return StorageError(f"{what}: writing into {root} failed: {reason}")
    if e.errno in (errno.EPERM, errno.EACCES) and os.geteuid() != 0:
        return SetupError(
            f"{what}: {reason} ({e.filename}); layers must be applied as root or under fakeroot",
            hint="Run the applier through hutch.images.rootfs (it uses fakeroot); "
            "apt-get install fakeroot",
        )
    return _image_error(label, entry, f"{reason} ({e.filename or '?'})")


def write_file(
    root: Path,
    path: str,
    data: bytes,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    meta: TreeMeta | None = None,
) -> None:
    """Put a file at ``path`` inside ``root`` with the applier's rules (parents resolved inside
    the root, missing ones created, whatever is there replaced; recorded in ``meta``)."""
    applier = _Applier(root, "extra files", LayerLimits(), LayerBudget(), meta)
    try:
        parts = applier.split(path)
        if not parts:
            raise _Refused("empty path")
        parent = applier.resolve_dir(parts[:-1], create=True)
        assert parent is not None
        key = f"{parent}/{parts[-1]}" if parent else parts[-1]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd: int = applier._create(key, lambda p: os.open(p, flags, 0o600))
        try:
            _write_all(fd, data)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        applier.record(key, stat.S_IFREG | (mode & 0o7777), (uid, gid))
    except _Refused as e:
        raise ImageError(f"extra file {path!r}: {e}") from None
    except OSError as e:
        raise _os_error(e, "extra files", path, root) from e


def ensure_dirs(
    root: Path, dirs: tuple[tuple[str, int], ...], meta: TreeMeta | None = None
) -> list[str]:
    """Create top-level directories ``(name, mode)`` owned by root where nothing exists under
    that name (an existing entry, even a dangling symlink, is left alone). Returns those made
    (and records them in ``meta``)."""
    made = []
    for name, mode in dirs:
        path = os.path.join(root, name)
        if os.path.lexists(path):
            continue
        os.mkdir(path, 0o700)
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, mode)
        made.append(name)
        if meta is not None:
            meta.entries[name] = (stat.S_IFDIR | mode, 0, 0, 0, ())
    return made
