"""``box.files`` on the embedded and the remote runtime (``/v1/boxes/{id}/files/…`` through a real
server): the same calls, results and errors — a 100 MiB streamed round trip, metadata, changes,
typed errors, and a hostile guest tree downloaded safely over the server too."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hutch.errors import BadRequestError, InvalidStateError, NotFoundError

pytestmark = [pytest.mark.vm, pytest.mark.server]

MIB = 1 << 20


async def sh(box: Any, script: str) -> str:
    r = await box.exec("sh", "-c", script, timeout=120)
    assert r.exit_code == 0, r.stderr
    return str(r.stdout)


async def test_100mib_streamed_round_trip(shared_box: Any) -> None:
    sent = hashlib.sha256()
    seed = os.urandom(MIB)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(100):
            chunk = i.to_bytes(4, "little") + seed[4:]
            sent.update(chunk)
            yield chunk

    assert await shared_box.files.write("/root/big.bin", chunks(), mode=0o600) == 100 * MIB
    assert (await sh(shared_box, "sha256sum /root/big.bin")).split()[0] == sent.hexdigest()
    got = hashlib.sha256()
    total = 0
    async with shared_box.files.read_stream("/root/big.bin") as reader:
        async for chunk in reader:
            got.update(chunk)
            total += len(chunk)
    assert (total, got.hexdigest()) == (100 * MIB, sent.hexdigest())
    await shared_box.files.remove("/root/big.bin")


async def test_metadata_and_changes(shared_box: Any) -> None:
    f = shared_box.files
    await f.mkdir("/srv/p/q", parents=True, mode=0o750)
    assert await f.write("/srv/p/q/hello.txt", "héllo\n") == 7
    assert await f.read("srv/p/../p/q/hello.txt") == "héllo\n".encode()  # normalised
    await sh(shared_box, "ln -s hello.txt /srv/p/q/ln")
    entries = {i.name: i for i in await f.list("/srv/p/q")}
    assert entries["hello.txt"].type == "file" and entries["hello.txt"].size == 7
    assert entries["ln"].type == "symlink" and entries["ln"].link_target == "hello.txt"
    await f.chmod("/srv/p/q/hello.txt", 0o600)
    info = await f.stat("/srv/p/q/hello.txt")
    assert (info.name, info.mode) == ("hello.txt", 0o600)
    assert (await f.stat("/srv/p/q")).type == "dir"
    assert await f.exists("/srv/p/q/ln") and not await f.exists("/srv/p/nope")
    await f.remove("/srv/p", recursive=True)
    assert not await f.exists("/srv/p")


async def test_errors_are_the_same(any_runtime: Any, shared_box: Any) -> None:
    f = shared_box.files
    with pytest.raises(NotFoundError, match="/no/such"):
        await f.read("/no/such")
    with pytest.raises(NotFoundError):
        await f.stat("/no/such")
    with pytest.raises(BadRequestError, match="Is a directory"):
        await f.read("/etc")
    with pytest.raises(BadRequestError, match="Not a directory"):
        await f.list("/etc/passwd")
    with pytest.raises(BadRequestError, match="root directory"):
        await f.remove("/", recursive=True)
    stopped = await any_runtime.create(image="busybox", name="parity-files-stopped")
    try:
        with pytest.raises(InvalidStateError):
            await stopped.files.stat("/")
    finally:
        await any_runtime.remove(stopped.id, force=True)


async def test_hostile_tree_download(shared_box: Any, tmp_path: Path) -> None:
    await sh(
        shared_box,
        "rm -rf /h && mkdir -p /h/d && cd /h && ln -s /etc link && ln -s ../../../tmp/x evil "
        "&& ln -s d/f ok && echo in > d/f && mkfifo fifo",
    )
    out = tmp_path / "out"
    report = await shared_box.files.download("/h", out)
    assert sorted(n for n, _ in report.skipped) == ["evil", "fifo", "link"]
    assert sorted(p.name for p in out.iterdir()) == ["d", "ok"]
    assert (out / "d/f").read_text() == "in\n" and os.readlink(out / "ok") == "d/f"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing beside it
    report = await shared_box.files.upload(out / "d", "/h/up")
    assert (report.files, await shared_box.files.read("/h/up/f")) == (1, b"in\n")
    await shared_box.files.remove("/h", recursive=True)
