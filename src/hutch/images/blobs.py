"""Content-addressed blob cache: ``HOME/images/blobs/sha256/<hex>``.

Rules that keep it trustworthy:

- **Atomic.** A blob is written (or downloaded, resumably) under ``partial/`` and renamed to its
  digest only after its digest was checked, so a half-written or tampered blob never appears under
  a digest. Whoever commits a partial file must have verified it: the registry client hashes while
  it downloads, :meth:`BlobCache.ingest` hashes while it copies.
- **Shared by concurrent pulls.** A per-digest ``flock`` serialises fetchers of the same blob
  across threads and processes: the second waits and then finds the blob committed (or resumes
  the partial file the first one left after a failure).
- **Bounded.** :meth:`BlobCache.prune` deletes least-recently-used blobs (mtime, touched on every
  use) until the cache fits its budget. Base disks don't need their blobs once built, so every
  blob is prunable except those a pull in progress pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hutch.errors import ImageError, StorageError
from hutch.images.oci import check_digest, new_hasher

#: Default budget of the blob cache (bytes); ``[images] cache_max_bytes`` in config.toml overrides.
DEFAULT_MAX_BYTES = 20 << 30
_LOCK_POLL = 0.05
_COPY_CHUNK = 1 << 20


def storage_error(path: Path, exc: OSError, doing: str) -> StorageError:
    """A StorageError naming the path, the reason and the free space there."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        space = f"; {free >> 20} MiB free on {probe}"
    except OSError:
        space = ""
    if exc.errno == errno.ENOSPC:
        hint = "Free disk space (e.g. `hutch prune`) or point HUTCH_HOME at a bigger disk."
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "Make the hutch home writable, or set HUTCH_HOME to a folder you own."
    else:
        hint = "Check the hutch home's disk."
    return StorageError(f"{doing} {path} failed: {exc.strerror or exc}{space}", hint=hint)


class Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


@dataclass(frozen=True)
class BlobSlot:
    """What a fetcher holding a digest's lock works with."""

    digest: str
    final: Path
    partial: Path

    @property
    def present(self) -> bool:
        return self.final.is_file()


class BlobCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    # --- layout ---------------------------------------------------------------------------
    def _split(self, digest: str) -> tuple[str, str]:
        check_digest(digest)
        algo, hexpart = digest.split(":", 1)
        return algo, hexpart

    def final_path(self, digest: str) -> Path:
        algo, hexpart = self._split(digest)
        return self.root / algo / hexpart

    def partial_path(self, digest: str) -> Path:
        algo, hexpart = self._split(digest)
        return self.root / "partial" / f"{algo}-{hexpart}"

    def _lock_path(self, digest: str) -> Path:
        algo, hexpart = self._split(digest)
        return self.root / "locks" / f"{algo}-{hexpart}.lock"

    def _ensure_dirs(self, digest: str) -> None:
        algo, _ = self._split(digest)
        for d in (self.root / algo, self.root / "partial", self.root / "locks"):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise storage_error(d, e, "creating") from e

    # --- reading --------------------------------------------------------------------------
    def get(self, digest: str) -> Path | None:
        """The committed blob's path (and mark it recently used), or None."""
        p = self.final_path(digest)
        try:
            os.utime(p)
        except FileNotFoundError:
            return None
        except OSError:
            pass  # read-only cache: still usable
        return p

    def read_bytes(self, digest: str, limit: int) -> bytes | None:
        p = self.get(digest)
        if p is None:
            return None
        if p.stat().st_size > limit:
            raise ImageError(f"cached blob {digest} is larger than {limit} bytes")
        return p.read_bytes()

    # --- writing --------------------------------------------------------------------------
    def _open_lock(self, digest: str) -> int:
        self._ensure_dirs(digest)
        lock = self._lock_path(digest)
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise storage_error(lock, e, "opening") from e

    @contextlib.asynccontextmanager
    async def slot(self, digest: str) -> AsyncIterator[BlobSlot]:
        """Hold the digest's lock (across processes) while fetching it.

        Polls a non-blocking ``flock`` rather than blocking a thread, so cancelling the waiter
        (Ctrl-C, a pull's deadline) is immediate and leaks nothing.
        """
        fd = self._open_lock(digest)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            yield BlobSlot(digest, self.final_path(digest), self.partial_path(digest))
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def slot_sync(self, digest: str) -> Iterator[BlobSlot]:
        """Blocking twin of :meth:`slot` for synchronous importers."""
        fd = self._open_lock(digest)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield BlobSlot(digest, self.final_path(digest), self.partial_path(digest))
        finally:
            os.close(fd)

    def commit(self, slot: BlobSlot) -> Path:
        """Move a **verified** partial file under its digest (atomic rename, made durable)."""
        try:
            with slot.partial.open("rb") as f:
                os.fsync(f.fileno())
            os.chmod(slot.partial, 0o444)
            os.replace(slot.partial, slot.final)
        except OSError as e:
            raise storage_error(slot.final, e, "committing blob") from e
        return slot.final

    def ingest(self, src: Readable, digest: str, *, size: int | None = None) -> Path:
        """Copy a stream into the cache, verifying its digest (and size) while copying."""
        existing = self.get(digest)
        if existing is not None:
            return existing
        with self.slot_sync(digest) as slot:
            if slot.present:
                return slot.final
            h = new_hasher(digest)
            n = 0
            try:
                with slot.partial.open("wb") as out:
                    while chunk := src.read(_COPY_CHUNK):
                        n += len(chunk)
                        if size is not None and n > size:
                            break
                        h.update(chunk)
                        out.write(chunk)
            except OSError as e:
                slot.partial.unlink(missing_ok=True)
                raise storage_error(slot.partial, e, "writing blob") from e
            got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
            if got != digest or (size is not None and n != size):
                slot.partial.unlink(missing_ok=True)
                raise ImageError(
                    f"blob {digest} failed its digest check (got {got}, {n} bytes"
                    + (f", expected {size}" if size is not None else "")
                    + ")",
                    hint="The archive is corrupted or was tampered with; nothing was cached.",
                )
            return self.commit(slot)

    def ingest_unknown(self, src: Readable) -> tuple[str, int]:
        """Copy a stream of not-yet-known digest into the cache; returns (sha256 digest, size)."""
        tmp_dir = self.root / "partial"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="ingest-", dir=tmp_dir)
        except OSError as e:
            raise storage_error(tmp_dir, e, "writing to") from e
        tmp = Path(name)
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            digest = "sha256:" + h.hexdigest()
            with self.slot_sync(digest) as slot:
                if slot.present:
                    tmp.unlink()
                    self.get(digest)
                else:
                    os.replace(tmp, slot.partial)
                    self.commit(slot)
            return digest, n
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise storage_error(tmp, e, "writing blob") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, data: bytes, digest: str) -> Path:
        import io

        return self.ingest(io.BytesIO(data), digest, size=len(data))

    # --- accounting -----------------------------------------------------------------------
    def entries(self) -> list[tuple[str, Path, int, float]]:
        """(digest, path, size, last used) of every committed blob."""
        out: list[tuple[str, Path, int, float]] = []
        if not self.root.is_dir():
            return out
        for algo_dir in self.root.iterdir():
            if algo_dir.name in ("partial", "locks") or not algo_dir.is_dir():
                continue
            for p in algo_dir.iterdir():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((f"{algo_dir.name}:{p.name}", p, st.st_size, st.st_mtime))
        return out

    def _unlink_if_idle(self, digest: str, path: Path) -> bool:
        """Delete ``path`` unless a fetcher holds the digest's lock right now."""
        fd = os.open(self._lock_path(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def usage(self) -> int:
        return sum(size for _, _, size, _ in self.entries())

    def prune(self, *, max_bytes: int | None = None, keep: Iterable[str] = ()) -> int:
        """Delete least-recently-used blobs until the cache holds ≤ ``max_bytes`` (default: its
        budget); never the ``keep`` digests. Also drops partial files untouched for a day.
        Returns the bytes freed."""
        budget = self.max_bytes if max_bytes is None else max_bytes
        pinned = set(keep)
        entries = sorted(self.entries(), key=lambda e: e[3])
        total = sum(e[2] for e in entries)
        freed = 0
        for digest, path, size, _ in entries:
            if total <= budget:
                break
            if digest in pinned:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                total -= size
                freed += size
        partial = self.root / "partial"
        if partial.is_dir():
            stale = time.time() - 86400
            for p in partial.iterdir():
                digest = p.name.replace("-", ":", 1)
                with contextlib.suppress(OSError, ImageError):
                    st = p.stat()
                    if (st.st_mtime < stale or budget == 0) and self._unlink_if_idle(digest, p):
                        freed += st.st_size
        return freed


__all__ = ["DEFAULT_MAX_BYTES", "BlobCache", "BlobSlot", "storage_error"]
