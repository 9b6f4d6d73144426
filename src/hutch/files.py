"""File access inside a running box: ``box.files`` (portal protocol 1.3, docs/PROTOCOL.md §3).

Every operation is served by the guest agent with plain syscalls (no shell, no helper binary).
Reads and writes are streamed in ``FILE_DATA`` frames under the portal's credit windows, so neither
side ever holds more than about one window (1 MiB) of a transfer, whatever the file's size.

**Guest paths** are normalised lexically before they are sent (:func:`guest_path`): a relative
path is taken relative to ``/``, ``.``/``..`` and repeated slashes are resolved *without* looking at
the guest (``/a/../b`` is ``/b``; ``/..`` is ``/``), NUL bytes are refused, and the result is at
most 4095 bytes. Symlinks in the guest are followed by the guest as usual (the guest can only reach
its own files).

**Downloads** treat every name and link target from the guest as hostile (:meth:`Files.download`):
names are validated (no ``/``, not ``.``/``..``, no NUL, at most 255 bytes), host files and
directories are created only through directory file descriptors with ``O_NOFOLLOW`` (a symlink
placed or swapped in under the target directory is never followed), guest symlinks are recreated
only when their target is relative and has no ``..`` component, so it can only point inside the
downloaded tree (others are skipped and listed in :attr:`TransferReport.skipped`), special files are skipped, and the number of entries is
bounded.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat as stat_mod
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hutch.errors import BadRequestError, GuestPermissionError, InvalidStateError, PortalError
from hutch.portal.channel import EOF, FileStream
from hutch.portal.codec import FILES_MINOR, Fields, FileOp, Tag, decode_tlv

if TYPE_CHECKING:
    from hutch.box import Box
    from hutch.portal.channel import PortalChannel

__all__ = [
    "FileInfo",
    "FileReader",
    "Files",
    "GuestPermissionError",
    "TransferReport",
    "guest_path",
    "valid_name",
]

#: Longest guest path (bytes, as the guest's PATH_MAX - 1).
MAX_PATH = 4095
#: Longest name of one directory entry (bytes).
MAX_NAME = 255
#: Bytes of host file read per FILE_DATA batch when uploading.
UPLOAD_CHUNK = 256 << 10
#: Default bound on the entries of one tree transfer.
MAX_TREE_ENTRIES = 100_000
#: What :meth:`Files.write` takes: bytes (``str`` is UTF-8) or an (async) iterable of chunks.
WriteData = bytes | bytearray | memoryview | str | AsyncIterable[bytes] | Iterable[bytes]
#: Most entries one listing returns (a paged LIST of a huge or hostile directory stops there).
MAX_LIST_ENTRIES = 1_000_000
#: Deepest directory nesting a tree transfer follows.
MAX_TREE_DEPTH = 128

FileType = Literal["file", "dir", "symlink", "other"]
_TYPES: dict[int, FileType] = {1: "file", 2: "dir", 3: "symlink", 4: "other"}


@dataclass(frozen=True)
class FileInfo:
    """One guest file as ``lstat`` sees it (symlinks are not followed)."""

    name: str
    type: FileType
    size: int
    mode: int  # permission bits, 0o7777
    mtime: float  # seconds since the epoch
    link_target: str | None = None


@dataclass
class TransferReport:
    """What :meth:`Files.upload` / :meth:`Files.download` did."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    #: Relative paths not transferred, with the reason (e.g. a symlink leaving the tree).
    skipped: list[tuple[str, str]] = field(default_factory=list)


def guest_path(path: str | os.PathLike[str]) -> str:
    """Normalise a guest path lexically (see the module docstring)."""
    p = os.fspath(path)
    if not isinstance(p, str):
        raise BadRequestError("guest paths are str")
    if "\0" in p:
        raise BadRequestError(f"guest path {p!r} contains a NUL byte")
    if not p:
        raise BadRequestError("empty guest path")
    norm = posixpath.normpath("/" + p)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if len(norm.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise BadRequestError(f"guest path of more than {MAX_PATH} bytes: {norm[:64]!r}…")
    return norm


def valid_name(name: str) -> bool:
    """A directory entry name the host accepts from the guest."""
    raw = name.encode("utf-8", "surrogateescape")
    return (
        0 < len(raw) <= MAX_NAME
        and b"/" not in raw
        and b"\0" not in raw
        and raw not in (b".", b"..")
    )


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _info(name: str, f: Fields) -> FileInfo:
    ftype = _TYPES.get(f.u(Tag.FTYPE, 4) or 4, "other")
    targets = f.all(Tag.LINK_TARGET)
    return FileInfo(
        name=name,
        type=ftype,
        size=f.u(Tag.SIZE, 0) or 0,
        mode=(f.u(Tag.MODE, 0) or 0) & 0o7777,
        mtime=(f.u(Tag.MTIME_NS, 0) or 0) / 1e9,
        link_target=_text(targets[-1][:MAX_PATH]) if targets and ftype == "symlink" else None,
    )


class FileReader:
    """An async iterator over the chunks of one guest file (at most 64 KiB each).

    The read starts at the first ``__anext__``; leaving the loop early (``break``, an exception)
    cancels it in the guest — call :meth:`aclose` or use ``async with`` to do so at once.
    """

    def __init__(self, files: Files, path: str) -> None:
        self._files = files
        self.path = path
        self._stream: FileStream | None = None
        self._done = False

    def __aiter__(self) -> FileReader:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._stream is None:
            channel = self._files._channel()
            self._stream = await channel.file_request(FileOp.READ, self.path)
        stream = self._stream
        try:
            data = await stream.queue.get()
        except BaseException:
            await self.aclose()
            raise
        if data is EOF:
            self._done = True
            await stream.reply  # raises the guest's error, if any
            raise StopAsyncIteration
        stream.consumed(len(data))
        return data

    async def aclose(self) -> None:
        self._done = True
        stream = self._stream
        if stream is not None and not stream.closed:
            await stream.cancel()

    async def __aenter__(self) -> FileReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        stream = self._stream
        if stream is not None and not stream.closed:
            with contextlib.suppress(Exception):
                stream.cancel_nowait()


class Files:
    """``box.files``: read, write, list and change files in the running guest (as root)."""

    def __init__(self, box: Box) -> None:
        self._box = box

    def __repr__(self) -> str:
        return f"<Files of box {self._box.id}>"

    def _channel(self) -> PortalChannel:
        channel = self._box._require_channel()
        hello = self._box.hello
        if hello is None or hello.minor < FILES_MINOR:
            raise InvalidStateError(
                f"the guest agent of box {self._box.id} predates file access (portal protocol "
                f"1.{hello.minor if hello else 0}, files need 1.{FILES_MINOR})",
                hint="Run `hutch setup` (rebuilds the guest agent), then restart the box.",
            )
        return channel

    async def _simple(
        self,
        op: FileOp,
        path: str,
        *,
        mode: int | None = None,
        flags: int = 0,
        cursor: int | None = None,
    ) -> Fields:
        stream = await self._channel().file_request(op, path, mode=mode, flags=flags, cursor=cursor)
        return await stream.reply

    # --- metadata ---------------------------------------------------------------------------
    async def stat(self, path: str | os.PathLike[str]) -> FileInfo:
        """``lstat`` of a guest path (a symlink is described, not followed)."""
        p = guest_path(path)
        return _info(posixpath.basename(p) or "/", await self._simple(FileOp.STAT, p))

    async def exists(self, path: str | os.PathLike[str]) -> bool:
        from hutch.errors import NotFoundError

        try:
            await self.stat(path)
        except NotFoundError:
            return False
        return True

    async def list(self, path: str | os.PathLike[str] = "/") -> list[FileInfo]:
        """The entries of a guest directory (without ``.`` and ``..``), sorted by name.

        A reply holds what fits in one frame (1 MiB: some 15 000 entries with short names); a
        larger directory comes in pages (1.4), at most :data:`MAX_LIST_ENTRIES` entries in all
        (:class:`BadRequestError` beyond). As with ``readdir``, entries added or removed while a
        long directory is listed may be missed or seen twice.
        """
        p = guest_path(path)
        out: list[FileInfo] = []
        cursor: int | None = None
        seen: set[int] = set()
        while True:
            fields = await self._simple(FileOp.LIST, p, cursor=cursor)
            for raw in fields.all(Tag.ENTRY):
                entry = decode_tlv(raw)
                names = entry.all(Tag.NAME)
                name = _text(names[-1]) if names else ""
                if not valid_name(name):
                    raise PortalError(f"guest listed an invalid name {name[:80]!r} in {p!r}")
                out.append(_info(name, entry))
            if len(out) > MAX_LIST_ENTRIES:
                raise BadRequestError(
                    f"guest directory {p!r} has more than {MAX_LIST_ENTRIES} entries",
                    hint="Split the directory, or archive it in the guest and download that.",
                )
            if not fields.u(Tag.TRUNCATED, 0):
                break
            cursor = fields.u(Tag.CURSOR)
            if cursor is None:  # an agent older than 1.4: it cannot page
                raise BadRequestError(
                    f"guest directory {p!r} has more entries than one listing of this guest "
                    "agent holds",
                    hint="Run `hutch setup` and restart the box (newer agents page long "
                    "listings), or split the directory.",
                )
            if cursor in seen:
                raise PortalError(f"guest repeated a listing cursor for {p!r}")
            seen.add(cursor)
        out.sort(key=lambda i: i.name)
        return out

    async def mkdir(
        self, path: str | os.PathLike[str], *, parents: bool = True, mode: int = 0o755
    ) -> None:
        """Create a directory; with ``parents`` also its missing parents (an existing directory
        is fine then, as with ``mkdir -p``); without, an existing one raises ConflictError."""
        await self._simple(FileOp.MKDIR, guest_path(path), mode=mode & 0o7777, flags=int(parents))

    async def remove(self, path: str | os.PathLike[str], *, recursive: bool = False) -> None:
        """Remove a file, symlink or empty directory; ``recursive`` removes a whole tree
        (symlinks inside are removed, never followed)."""
        p = guest_path(path)
        if p == "/":
            raise BadRequestError("refusing to remove the guest's root directory")
        await self._simple(FileOp.REMOVE, p, flags=int(recursive))

    async def chmod(self, path: str | os.PathLike[str], mode: int) -> None:
        await self._simple(FileOp.CHMOD, guest_path(path), mode=mode & 0o7777)

    # --- contents ---------------------------------------------------------------------------
    def read_stream(self, path: str | os.PathLike[str]) -> FileReader:
        """Stream a guest file: ``async for chunk in box.files.read_stream(path)``."""
        return FileReader(self, guest_path(path))

    async def read(self, path: str | os.PathLike[str]) -> bytes:
        """A whole guest file (held in memory: use :meth:`read_stream` for large files)."""
        out = bytearray()
        async with self.read_stream(path) as reader:
            async for chunk in reader:
                out += chunk
        return bytes(out)

    async def write(
        self,
        path: str | os.PathLike[str],
        data: WriteData,
        *,
        mode: int = 0o644,
    ) -> int:
        """Create or replace a guest file (its mode set to ``mode``) and return its size.

        ``data`` is bytes (``str`` is UTF-8 encoded) or an (async) iterable of byte chunks,
        streamed without collecting it. If the iterable raises, the guest file keeps what was
        written so far and the error propagates.
        """
        p = guest_path(path)
        stream = await self._channel().file_request(FileOp.WRITE, p, mode=mode & 0o7777)
        try:
            async for chunk in byte_chunks(data):
                await stream.write(chunk)
                if stream.closed:
                    break
            await stream.end()
            fields = await stream.reply
        except BaseException:
            if not stream.closed:
                stream.cancel_nowait()
            raise
        return fields.u(Tag.SIZE, 0) or 0

    # --- trees ------------------------------------------------------------------------------
    async def upload(
        self, host_path: str | os.PathLike[str], guest_dest: str | os.PathLike[str]
    ) -> TransferReport:
        """Copy a host file or directory tree to ``guest_dest`` (created or replaced; parents
        are created). Modes are kept; host symlinks and special files are skipped (listed in
        the report), so nothing outside ``host_path`` is read."""
        src = Path(host_path)
        dest = guest_path(guest_dest)
        report = TransferReport()
        st = os.lstat(src)
        if stat_mod.S_ISDIR(st.st_mode):
            await self._upload_dir(src, dest, report, 0)
        elif stat_mod.S_ISREG(st.st_mode):
            parent = posixpath.dirname(dest)
            if parent != "/":
                await self.mkdir(parent, parents=True)
            await self._upload_file(src, dest, st.st_mode, report)
        else:
            raise BadRequestError(f"{src} is not a regular file or directory")
        return report

    async def _upload_file(self, src: Path, dest: str, mode: int, report: TransferReport) -> None:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := os.read(fd, UPLOAD_CHUNK):
                yield chunk

        try:
            report.bytes += await self.write(dest, chunks(), mode=mode & 0o7777)
        finally:
            os.close(fd)
        report.files += 1

    async def _upload_dir(self, src: Path, dest: str, report: TransferReport, depth: int) -> None:
        if depth > MAX_TREE_DEPTH:
            raise BadRequestError(f"{src}: directories nest deeper than {MAX_TREE_DEPTH}")
        mode = os.lstat(src).st_mode & 0o7777
        await self.mkdir(dest, parents=True, mode=0o700)
        report.dirs += 1
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if report.files + report.dirs > MAX_TREE_ENTRIES:
                raise BadRequestError(f"more than {MAX_TREE_ENTRIES} entries under {src}")
            child = posixpath.join(dest, entry.name)
            if entry.is_symlink():
                report.skipped.append((str(Path(entry.path)), "symlink"))
            elif entry.is_dir(follow_symlinks=False):
                await self._upload_dir(Path(entry.path), child, report, depth + 1)
            elif entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                await self._upload_file(Path(entry.path), child, st.st_mode, report)
            else:
                report.skipped.append((str(Path(entry.path)), "special file"))
        await self.chmod(dest, mode)  # last, so a read-only directory can still be filled

    async def download(
        self,
        guest_src: str | os.PathLike[str],
        host_path: str | os.PathLike[str],
        *,
        max_entries: int = MAX_TREE_ENTRIES,
    ) -> TransferReport:
        """Copy a guest file or directory tree to ``host_path``.

        A file is written to ``host_path`` itself (replaced; its parent must exist). A directory
        becomes ``host_path`` (created if missing) and everything is written strictly inside it,
        however hostile the guest (see the module docstring). Permission bits are kept minus
        setuid/setgid/sticky; file mtimes are kept.
        """
        src = guest_path(guest_src)
        dest = Path(host_path)
        info = await self.stat(src)
        report = TransferReport()
        if info.type == "file":
            parent_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                await self._download_file(src, parent_fd, dest.name, info, report)
            finally:
                os.close(parent_fd)
            return report
        if info.type != "dir":
            raise BadRequestError(
                f"guest path {src!r} is a {info.type}, not a file or directory",
                hint="Download the symlink's target instead." if info.type == "symlink" else "",
            )
        with contextlib.suppress(FileExistsError):
            os.mkdir(dest, 0o700)
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            await self._download_dir(src, root_fd, "", info, report, max_entries, 0)
        finally:
            os.close(root_fd)
        return report

    async def _download_file(
        self, src: str, dir_fd: int, name: str, info: FileInfo, report: TransferReport
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                raise BadRequestError(f"host path for {src!r} exists and is not a regular file")
            async with self.read_stream(src) as reader:
                async for chunk in reader:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    report.bytes += len(chunk)
            os.fchmod(fd, info.mode & 0o777)
            ns = int(info.mtime * 1e9)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)
        report.files += 1

    async def _download_dir(
        self,
        src: str,
        dir_fd: int,
        rel: str,
        info: FileInfo,
        report: TransferReport,
        max_entries: int,
        depth: int,
    ) -> None:
        if depth > MAX_TREE_DEPTH:
            raise BadRequestError(f"guest directories under {src!r} nest deeper than allowed")
        report.dirs += 1
        for entry in await self.list(src):
            if report.files + report.dirs + report.symlinks + len(report.skipped) >= max_entries:
                raise BadRequestError(
                    f"the guest tree has more than {max_entries} entries",
                    hint="Pass a larger max_entries, or download a smaller subtree.",
                )
            name = entry.name
            if not valid_name(name):  # list() checks too: never trust a single check
                raise PortalError(f"guest sent an invalid name {name[:80]!r}")
            child_src = posixpath.join(src, name)
            child_rel = posixpath.join(rel, name) if rel else name
            if entry.type == "file":
                await self._download_file(child_src, dir_fd, name, entry, report)
            elif entry.type == "dir":
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                child_fd = os.open(name, flags, dir_fd=dir_fd)
                try:
                    await self._download_dir(
                        child_src, child_fd, child_rel, entry, report, max_entries, depth + 1
                    )
                finally:
                    os.close(child_fd)
            elif entry.type == "symlink":
                target = entry.link_target or ""
                if _link_stays_inside(target):
                    os.symlink(target, name, dir_fd=dir_fd)
                    report.symlinks += 1
                else:
                    report.skipped.append((child_rel, f"symlink leaving the tree -> {target!r}"))
            else:
                report.skipped.append((child_rel, "special file"))
        os.fchmod(dir_fd, (info.mode & 0o777) | 0o700)


async def byte_chunks(data: WriteData) -> AsyncIterator[bytes | memoryview]:
    """What :meth:`Files.write` takes, as chunks: bytes in slices of 1 MiB (``str`` as UTF-8),
    an (async) iterable's chunks as they come."""
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for off in range(0, len(view), 1 << 20):
            yield view[off : off + (1 << 20)]
    elif isinstance(data, AsyncIterable):
        async for chunk in data:
            yield chunk
    else:
        for chunk in data:
            yield chunk


def _link_stays_inside(target: str) -> bool:
    """True if a guest symlink with this ``target`` may be recreated on the host: relative, and
    without any ``..`` component, so it can only descend from its own directory (also through
    other such links). A lexical check that allowed ``..`` would be unsound: ``s/l1 -> ..`` plus
    ``l2 -> s/l1/..`` looks inside but leaves the tree."""
    if not target or "\0" in target or target.startswith("/") or len(target) > MAX_PATH:
        return False
    return ".." not in target.split("/")
