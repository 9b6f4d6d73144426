"""hutch.sync: the blocking twins come from one mechanism and work inside a running loop."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import hutch
import hutch.sync
from tests.support.homes import make_home

pytestmark = pytest.mark.vm


def test_every_public_async_method_has_a_blocking_twin() -> None:
    from hutch.client import RemoteBox, RemoteExecution, RemoteRuntime

    for cls in (
        hutch.Box,
        hutch.Runtime,
        hutch.Execution,
        RemoteRuntime,
        RemoteBox,
        RemoteExecution,
    ):
        names = [
            n
            for n, f in inspect.getmembers(cls, inspect.iscoroutinefunction)
            if not n.startswith("_")
        ]
        assert names, cls
        proxy = hutch.sync.Synced(object.__new__(cls))
        for n in names:
            twin = getattr(proxy, n)
            assert callable(twin) and not inspect.iscoroutinefunction(twin), (cls, n)


async def test_sync_runtime_inside_a_running_loop(tmp_path: Path) -> None:
    # This test body runs inside pytest-asyncio's loop, as Jupyter code would.
    with hutch.sync.Runtime(make_home(tmp_path / "home")) as rt:
        box = rt.create(image="busybox", name="sync-box")
        box.start()
        assert box.exec("echo", "hi").stdout == "hi\n"
        assert [r.name for r in rt.list()] == ["sync-box"]
        assert rt.get("sync-box").id == box.id
        assert rt.metrics().commands == 1
        rt.remove("sync-box", force=True)
        assert rt.list() == []


def test_sync_fork_returns_blocking_boxes(tmp_path: Path) -> None:
    with hutch.sync.Runtime(make_home(tmp_path / "home")) as rt:
        box = rt.create(image="busybox")
        box.start()
        box.exec("sh", "-c", "echo shared > /root/f")
        clones = box.fork(2)
        try:
            assert len(clones) == 2
            for c in clones:
                assert isinstance(c, hutch.sync.Synced)
                assert c.exec("cat", "/root/f").stdout == "shared\n"
        finally:
            for c in clones:
                rt.remove(c.id, force=True)
            rt.remove(box.id, force=True)
