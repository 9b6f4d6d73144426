"""Real `hutch serve` processes (one on a Unix socket, one on TCP) and one booted box, shared by
the server tests: VMs boot under TCG here, so the suite boots as few as it can."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from hutch.client import RemoteBox, connect
from tests.support.homes import make_home
from tests.support.registry import free_port
from tests.support.server import ServerProcess


@pytest.fixture(scope="session")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(make_home(tmp_path_factory.mktemp("srv-unix") / "home")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = make_home(tmp_path_factory.mktemp("srv-tcp") / "home")
    server = ServerProcess(home, listen=f"127.0.0.1:{free_port()}").start()
    try:
        yield server
    finally:
        server.stop()


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
