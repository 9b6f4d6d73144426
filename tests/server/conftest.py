"""One booted box on the Unix-socket server, shared by the server tests: VMs boot under TCG here,
so the suite boots as few as it can. The servers themselves (``unix_server``, ``tcp_server``) are
session fixtures of tests/support/server.py, shared with tests/parity."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from hutch.client import RemoteBox, connect
from tests.support.server import ServerProcess


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def remote_box(unix_server: ServerProcess) -> AsyncIterator[RemoteBox]:
    """One running busybox box on the Unix-socket server, named ``shared``."""
    rt = await connect(unix_server.url)
    box = await rt.create(image="busybox", name="shared")
    await box.start()
    try:
        yield box
    finally:
        await box.remove()
        await rt.close()
