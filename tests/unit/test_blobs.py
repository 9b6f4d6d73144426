"""The blob cache: atomic, digest-checked, shared between fetchers, LRU-bounded."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from hutch.errors import ImageError
from hutch.images.blobs import BlobCache


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_ingest_verifies_and_commits(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    data = os.urandom(3 << 20)
    p = cache.ingest(io.BytesIO(data), digest(data), size=len(data))
    assert p.read_bytes() == data
    assert cache.get(digest(data)) == p
    assert oct(p.stat().st_mode & 0o777) == oct(0o444)
    assert cache.usage() == len(data)


def test_tampered_content_is_never_cached(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    data = b"genuine" * 1000
    with pytest.raises(ImageError, match=digest(data)):
        cache.ingest(io.BytesIO(data + b"!"), digest(data))
    assert cache.get(digest(data)) is None
    assert not cache.partial_path(digest(data)).exists()
    # a short stream with the right prefix is refused on size too
    with pytest.raises(ImageError):
        cache.ingest(io.BytesIO(data[:-1]), digest(data), size=len(data))
    assert cache.entries() == []


def test_ingest_unknown_computes_the_digest(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    data = b"x" * 12345
    d, n = cache.ingest_unknown(io.BytesIO(data))
    assert (d, n) == (digest(data), len(data))
    again = cache.ingest_unknown(io.BytesIO(data))
    assert again == (d, n)
    assert len(cache.entries()) == 1
    assert list((tmp_path / "partial").iterdir()) == []


def test_bad_digest_strings_are_rejected(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64, ""):
        with pytest.raises(ImageError):
            cache.final_path(bad)


async def test_slot_is_exclusive_per_digest(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    data = b"shared layer"
    d = digest(data)
    order: list[str] = []

    async def fetcher(name: str) -> None:
        async with cache.slot(d) as slot:
            order.append(f"{name} in (present={slot.present})")
            if not slot.present:
                await asyncio.sleep(0.2)
                slot.partial.write_bytes(data)
                cache.commit(slot)
            order.append(f"{name} out")

    await asyncio.gather(fetcher("a"), fetcher("b"))
    assert order == ["a in (present=False)", "a out", "b in (present=True)", "b out"]


async def test_waiting_for_a_slot_can_be_cancelled(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    d = digest(b"z")
    async with cache.slot(d):
        waiter = asyncio.create_task(cache.slot(d).__aenter__())
        await asyncio.sleep(0.15)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    async with asyncio.timeout(2):  # the lock is free again
        async with cache.slot(d):
            pass


def test_prune_drops_least_recently_used_first(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=2500)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    for i, b in enumerate(blobs):
        cache.put_bytes(b, digest(b))
        os.utime(cache.final_path(digest(b)), (time.time() - 100 + i, time.time() - 100 + i))
    cache.get(digest(blobs[0]))  # used just now: newest
    freed = cache.prune(keep={digest(blobs[1])})
    left = {d for d, *_ in cache.entries()}
    # oldest unpinned (2 then 3...) go until ≤ 2500 bytes remain; 0 (recent) and 1 (pinned) stay
    assert digest(blobs[0]) in left and digest(blobs[1]) in left
    assert len(left) == 2 and freed == 2000
    assert cache.prune(max_bytes=0) == 2000
    assert cache.entries() == []


async def test_prune_keeps_partials_a_fetcher_is_using(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    d = digest(b"in flight")
    async with cache.slot(d) as slot:
        slot.partial.write_bytes(b"in fl")
        cache.prune(max_bytes=0)
        assert slot.partial.exists()  # locked: not touched
    cache.prune(max_bytes=0)
    assert not slot.partial.exists()  # idle: dropped
