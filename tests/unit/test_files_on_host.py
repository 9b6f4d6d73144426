"""``box.files`` against the real agent binary in its host test mode (no QEMU): fast coverage of
the file messages; tests/vm/test_files.py checks the same in real guests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from hutch.errors import BadRequestError, ConflictError, InvalidStateError, NotFoundError
from hutch.files import Files
from hutch.portal import Hello, PortalChannel


class FakeBox:
    id = "on-host"

    def __init__(self, channel: PortalChannel, hello: Hello) -> None:
        self._channel = channel
        self.hello: Hello | None = hello

    def _require_channel(self) -> PortalChannel:
        return self._channel


@pytest_asyncio.fixture(loop_scope="session")
async def files(agent_binary: Path) -> AsyncIterator[Files]:
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "portal.sock")
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.set_result((r, w))

        server = await asyncio.start_unix_server(on_conn, sock)
        proc = await asyncio.create_subprocess_exec(str(agent_binary), "--portal-socket", sock)
        r, w = await asyncio.wait_for(accepted, 10)
        channel = PortalChannel(r, w)
        hello = await asyncio.wait_for(channel.wait_hello(), 10)
        try:
            yield Files(FakeBox(channel, hello))  # type: ignore[arg-type]
        finally:
            await channel.shutdown()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            await channel.close()
            server.close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


async def test_write_read_stat_list(files: Files, tmp: Path) -> None:
    data = os.urandom(3 << 20) + b"tail"
    assert await files.write(tmp / "f.bin", data, mode=0o640) == len(data)
    assert (tmp / "f.bin").read_bytes() == data
    assert (tmp / "f.bin").stat().st_mode & 0o777 == 0o640
    assert await files.read(tmp / "f.bin") == data
    info = await files.stat(tmp / "f.bin")
    assert (info.name, info.type, info.size, info.mode) == ("f.bin", "file", len(data), 0o640)
    os.symlink("f.bin", tmp / "ln")
    await files.mkdir(tmp / "a/b/c")
    names = {(i.name, i.type, i.link_target) for i in await files.list(tmp)}
    assert names == {("f.bin", "file", None), ("ln", "symlink", "f.bin"), ("a", "dir", None)}
    await files.chmod(tmp / "f.bin", 0o600)
    assert (tmp / "f.bin").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConflictError):
        await files.remove(tmp / "a")
    await files.remove(tmp / "a", recursive=True)
    await files.remove(tmp / "ln")
    assert not (tmp / "a").exists() and (tmp / "f.bin").exists()


async def test_errors_typed(files: Files, tmp: Path) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        await files.read(tmp / "nope")
    with pytest.raises(NotFoundError):
        await files.stat(tmp / "nope")
    with pytest.raises(BadRequestError, match="Is a directory"):
        await files.read(tmp)
    (tmp / "f").write_text("x")
    with pytest.raises(BadRequestError, match="Not a directory"):
        await files.list(tmp / "f")
    with pytest.raises(ConflictError):
        await files.mkdir(tmp / "f", parents=False)
    with pytest.raises(BadRequestError):
        await files.remove("/")
    os.mkfifo(tmp / "fifo")  # refused, never opened: opening a FIFO would block the agent
    with pytest.raises(BadRequestError, match="Invalid argument"):
        await asyncio.wait_for(files.write(tmp / "fifo", b"x"), 5)
    with pytest.raises(BadRequestError, match="Invalid argument"):
        await asyncio.wait_for(files.read(tmp / "fifo"), 5)


async def test_stream_and_cancel(files: Files, tmp: Path) -> None:
    data = os.urandom(5 << 20)
    (tmp / "big").write_bytes(data)
    h = hashlib.sha256()
    async for chunk in files.read_stream(tmp / "big"):
        assert len(chunk) <= 64 << 10
        h.update(chunk)
    assert h.digest() == hashlib.sha256(data).digest()
    reader = files.read_stream(tmp / "big")
    async for _ in reader:
        break
    await reader.aclose()
    # the channel still works after a cancelled read
    assert await files.read(tmp / "big") == data

    async def gen() -> AsyncIterator[bytes]:
        for i in range(40):
            yield bytes([i]) * 100_000

    assert await files.write(tmp / "gen", gen()) == 4_000_000
    assert (tmp / "gen").read_bytes() == b"".join(bytes([i]) * 100_000 for i in range(40))


async def test_old_agent_refused(files: Files) -> None:
    box = files._box
    assert box.hello is not None
    import dataclasses

    old = box.hello
    box.hello = dataclasses.replace(old, minor=2)
    try:
        with pytest.raises(InvalidStateError, match="hutch setup"):
            await files.stat("/")
    finally:
        box.hello = old


async def test_upload_download_tree(files: Files, tmp: Path) -> None:
    src = tmp / "src"
    (src / "sub/deeper").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub/deeper/data").write_bytes(os.urandom(200_000))
    (src / "sub").chmod(0o711)
    os.symlink("/etc/passwd", src / "hostlink")
    report = await files.upload(src, tmp / "guest/copy")
    assert (report.files, report.dirs) == (2, 3)
    assert [s for s, _ in report.skipped] == [str(src / "hostlink")]
    dst = tmp / "guest/copy"
    assert (dst / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (dst / "sub").stat().st_mode & 0o777 == 0o711
    assert (dst / "sub/deeper/data").read_bytes() == (src / "sub/deeper/data").read_bytes()
    back = tmp / "back"
    report = await files.download(tmp / "guest/copy", back)
    assert (report.files, report.dirs) == (2, 3)
    assert (back / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (back / "sub/deeper/data").read_bytes() == (src / "sub/deeper/data").read_bytes()


async def test_hostile_tree_download(files: Files, tmp: Path) -> None:
    g = tmp / "guest"
    (g / "d").mkdir(parents=True)
    os.symlink("/etc", g / "link")
    os.symlink("../../../tmp/x", g / "evil")
    os.symlink("d/inner", g / "ok")
    (g / "d/inner").write_text("inside")
    os.mkfifo(g / "fifo")
    out = tmp / "out"
    out.mkdir()
    # a symlink planted in the target directory is never followed
    outside = tmp / "outside"
    outside.mkdir()
    os.symlink(outside, out / "d")
    with pytest.raises(OSError):
        await files.download(g, out)
    assert list(outside.iterdir()) == []
    (out / "d").unlink()
    report = await files.download(g, out)
    assert sorted(n for n, _ in report.skipped) == ["evil", "fifo", "link"]
    assert os.readlink(out / "ok") == "d/inner"
    assert not (out / "link").exists() and not (out / "evil").exists()
    assert sorted(p.name for p in out.iterdir()) == ["d", "ok"]
    with pytest.raises(BadRequestError, match="more than 2 entries"):
        await files.download(g, tmp / "out2", max_entries=2)


async def test_concurrent_transfers(files: Files, tmp: Path) -> None:
    blobs = [os.urandom(1_500_000 + i) for i in range(8)]
    await asyncio.gather(*(files.write(tmp / f"c{i}", b) for i, b in enumerate(blobs)))
    got = await asyncio.gather(*(files.read(tmp / f"c{i}") for i in range(8)))
    assert [hashlib.sha256(g).digest() for g in got] == [hashlib.sha256(b).digest() for b in blobs]
