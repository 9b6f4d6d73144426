"""A guest directory whose listing does not fit in one frame (1 MiB) is listed whole, page by
page (LIST's CURSOR, protocol 1.4), by ``box.files.list`` and by a tree download."""

from __future__ import annotations

from pathlib import Path

import pytest

import hutch
from tests.support.homes import make_home

pytestmark = pytest.mark.vm

#: 120-byte names: ~190 bytes per listed entry, so 9000 entries take two replies.
COUNT = 9000
STEM = "n" * 114


async def test_a_directory_longer_than_one_reply(tmp_path: Path) -> None:
    async with hutch.Runtime(make_home(tmp_path / "home")) as rt:
        box = await rt.create(image="busybox", memory_mib=256)
        await box.start()
        try:
            script = f"mkdir /tmp/big && cd /tmp/big && seq -w 1 {COUNT} | sed 's/^/{STEM}/' | xargs touch"
            (await box.exec("sh", "-c", script, timeout=120)).assert_success()
            listing = await box.files.list("/tmp/big")
            expected = sorted(f"{STEM}{i:0{len(str(COUNT))}d}" for i in range(1, COUNT + 1))
            assert [i.name for i in listing] == expected
            assert sum(len(i.name) + 70 for i in listing) > 1 << 20  # really more than one reply
            report = await box.files.download("/tmp/big", tmp_path / "big")
            assert sorted(p.name for p in (tmp_path / "big").iterdir()) == expected, report
        finally:
            await rt.remove(box.id, force=True)
