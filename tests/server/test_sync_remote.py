"""hutch.sync.connect: the blocking twin of hutch.connect, by the same wrapping mechanism."""

from __future__ import annotations

import pytest

import hutch
import hutch.sync
from tests.support.server import ServerProcess

pytestmark = [pytest.mark.vm, pytest.mark.server]


def test_sync_connect_drives_a_server_box(unix_server: ServerProcess) -> None:
    with hutch.sync.connect(unix_server.url) as rt:
        box = rt.create(image="busybox", name="sync-remote")
        try:
            box.start()
            r = box.exec("sh", "-c", "read x; echo got $x", stdin="it\n")
            assert isinstance(r, hutch.ExecResult) and r.stdout == "got it\n"
            proc = box.spawn("sh", "-c", "echo a; echo b >&2")
            assert b"".join(proc.stdout) == b"a\n"
            assert proc.wait().exit_code == 0
            assert [x.name for x in rt.list() if x.name == "sync-remote"] == ["sync-remote"]
            assert box.metrics().memory_bytes > 0
        finally:
            rt.remove("sync-remote", force=True)
        with pytest.raises(hutch.NotFoundError):
            rt.get("sync-remote")
