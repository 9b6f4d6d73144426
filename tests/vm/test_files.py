"""``box.files`` in a real guest: streamed 100 MiB round trip, metadata, typed errors, hostile
tree downloads, tree uploads, and the blocking wrapper."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

import hutch
from hutch.errors import BadRequestError, ConflictError, NotFoundError
from hutch.files import GuestPermissionError

pytestmark = pytest.mark.vm

MIB = 1 << 20


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fbox(manifest) -> AsyncIterator[hutch.Box]:  # type: ignore[no-untyped-def]
    async with hutch.Box("busybox", cpus=2, memory_mib=256) as b:
        yield b


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


async def sh(box: hutch.Box, script: str) -> str:
    r = await box.exec("sh", "-c", script, timeout=120)
    assert r.exit_code == 0, r.stderr
    return r.stdout


async def test_100mib_round_trip_bounded_memory(fbox: hutch.Box) -> None:
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    sent = hashlib.sha256()
    seed = os.urandom(MIB)

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal peak
        for i in range(100):
            chunk = hashlib.sha256(i.to_bytes(4, "little")).digest() + seed[32:]
            sent.update(chunk)
            peak = max(peak, proc.memory_info().rss)
            yield chunk

    assert await fbox.files.write("/root/big.bin", chunks(), mode=0o600) == 100 * MIB
    guest_sum = (await sh(fbox, "sha256sum /root/big.bin")).split()[0]
    assert guest_sum == sent.hexdigest()
    info = await fbox.files.stat("/root/big.bin")
    assert (info.type, info.size, info.mode) == ("file", 100 * MIB, 0o600)
    got = hashlib.sha256()
    n = 0
    async for chunk in fbox.files.read_stream("/root/big.bin"):
        got.update(chunk)
        n += len(chunk)
        if n % (8 * MIB) < len(chunk):
            peak = max(peak, proc.memory_info().rss)
    assert n == 100 * MIB and got.hexdigest() == sent.hexdigest()
    assert peak - base < 100 * MIB, f"host RSS grew by {(peak - base) // MIB} MiB"
    await fbox.files.remove("/root/big.bin")


async def test_metadata_ops(fbox: hutch.Box) -> None:
    f = fbox.files
    await f.mkdir("/srv/a/b/c", mode=0o750)
    await f.write("/srv/a/hello.txt", "hi\n", mode=0o640)
    assert await f.read("/srv/a/../a/./hello.txt") == b"hi\n"
    await sh(fbox, "ln -s hello.txt /srv/a/ln")
    entries = {i.name: i for i in await f.list("/srv/a")}
    assert set(entries) == {"b", "hello.txt", "ln"}
    assert entries["b"].type == "dir" and entries["hello.txt"].size == 3
    assert entries["ln"].type == "symlink" and entries["ln"].link_target == "hello.txt"
    await f.chmod("/srv/a/hello.txt", 0o604)
    assert (await sh(fbox, "stat -c %a /srv/a/hello.txt")).strip() == "604"
    assert (await f.stat("/srv/a/hello.txt")).mode == 0o604
    with pytest.raises(ConflictError):
        await f.remove("/srv/a")
    with pytest.raises(ConflictError):
        await f.mkdir("/srv/a", parents=False)
    await f.remove("/srv/a/ln")
    await f.remove("/srv/a", recursive=True)
    assert not await f.exists("/srv/a")


async def test_errors_typed(fbox: hutch.Box) -> None:
    f = fbox.files
    with pytest.raises(NotFoundError, match="/no/such"):
        await f.read("/no/such")
    with pytest.raises(NotFoundError):
        await f.list("/no/such")
    with pytest.raises(BadRequestError, match="Is a directory"):
        await f.read("/etc")
    with pytest.raises(BadRequestError, match="Not a directory"):
        await f.list("/etc/passwd")
    await sh(fbox, "mkdir -p /mnt/ro && mount -t tmpfs -o ro tmpfs /mnt/ro")
    try:
        with pytest.raises(GuestPermissionError, match="/mnt/ro/x"):
            await f.write("/mnt/ro/x", b"y")
        with pytest.raises(GuestPermissionError, match="Read-only"):
            await f.mkdir("/mnt/ro/d")
    finally:
        await sh(fbox, "umount /mnt/ro")
    with pytest.raises(BadRequestError):
        await f.read("/a\0b")
    with pytest.raises(BadRequestError, match="Invalid argument"):
        await f.write("/dev/null", b"x")  # not a regular file: refused before opening


async def test_hostile_tree_download(fbox: hutch.Box, tmp: Path) -> None:
    await sh(
        fbox,
        "mkdir -p /h/d && cd /h && ln -s /etc link && ln -s ../../../tmp/x evil "
        "&& ln -s d/f ok && echo in > d/f && mkdir -p '/h/..x' && echo y > '/h/..x/...' "
        "&& mkfifo fifo",
    )
    out = tmp / "out"
    report = await fbox.files.download("/h", out)
    assert sorted(n for n, _ in report.skipped) == ["evil", "fifo", "link"]
    assert sorted(p.name for p in out.iterdir()) == ["..x", "d", "ok"]
    assert (out / "..x/...").read_text() == "y\n" and (out / "d/f").read_text() == "in\n"
    assert os.readlink(out / "ok") == "d/f"
    assert sorted(p.name for p in tmp.iterdir()) == ["out"]  # nothing written beside it
    # a huge directory is bounded
    await sh(
        fbox,
        "mkdir /h/many && cd /h/many && i=0; while [ $i -lt 300 ]; do : > f$i; i=$((i+1)); done",
    )
    with pytest.raises(BadRequestError, match="more than 100 entries"):
        await fbox.files.download("/h", tmp / "out2", max_entries=100)
    await fbox.files.remove("/h", recursive=True)


async def test_upload_tree_preserves_modes(fbox: hutch.Box, tmp: Path) -> None:
    src = tmp / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/tool").write_text("#!/bin/sh\necho tool\n")
    (src / "bin/tool").chmod(0o755)
    (src / "secret").write_bytes(os.urandom(300_000))
    (src / "secret").chmod(0o600)
    (src / "bin").chmod(0o751)
    report = await fbox.files.upload(src, "/opt/up")
    assert (report.files, report.dirs) == (2, 2)
    modes = await sh(fbox, "stat -c '%n %a' /opt/up/bin /opt/up/bin/tool /opt/up/secret")
    assert modes.split("\n")[:3] == [
        "/opt/up/bin 751",
        "/opt/up/bin/tool 755",
        "/opt/up/secret 600",
    ]
    assert (await sh(fbox, "/opt/up/bin/tool")) == "tool\n"
    back = tmp / "back"
    await fbox.files.download("/opt/up", back)
    assert (back / "secret").read_bytes() == (src / "secret").read_bytes()
    assert (back / "bin/tool").stat().st_mode & 0o777 == 0o755


async def test_sync_wrapper(tmp: Path) -> None:
    import hutch.sync

    def blocking() -> tuple[bytes, list[str]]:
        with hutch.sync.Box("busybox", memory_mib=128) as b:
            assert b.files.write("/tmp/sync.txt", b"sync", mode=0o600) == 4
            b.files.download("/tmp/sync.txt", tmp / "s.txt")
            with b.files.read_stream("/tmp/sync.txt") as reader:  # blocking iteration
                streamed = b"".join(reader)
            assert streamed == b"sync"
            return b.files.read("/tmp/sync.txt"), [i.name for i in b.files.list("/tmp")]

    data, names = await asyncio.to_thread(blocking)
    assert data == b"sync" and "sync.txt" in names
    assert (tmp / "s.txt").read_bytes() == b"sync"
