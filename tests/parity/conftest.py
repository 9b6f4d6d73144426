"""``any_runtime``: the same tests against the embedded :class:`hutch.Runtime` and against
``hutch.connect()`` to a real ``hutch serve`` on its Unix socket, so the two cannot drift.

The embedded runtime gets a home of its own (not the server's), so boxes of the two never meet; the
remote one is the session's ``unix_server``, shared with tests/server, so the tests here use names
starting with ``parity-`` and remove what they create."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import hutch
from hutch.client import connect
from tests.support.homes import make_home
from tests.support.server import ServerProcess

#: The box every exec/spawn/metrics test shares (one boot per runtime).
SHARED = "parity-box"
SHARED_ENV = {"FROM_BOX": "box", "BOTH": "box"}


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["embedded", "remote"])
async def any_runtime(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    """A :class:`hutch.Runtime` (``embedded``) or a :class:`hutch.client.RemoteRuntime`
    (``remote``); module scoped, so pytest runs every test with one, then with the other."""
    if request.param == "embedded":
        home = make_home(tmp_path_factory.mktemp("parity-embedded") / "home")
        async with hutch.Runtime(home) as rt:
            yield rt
    else:
        server: ServerProcess = request.getfixturevalue("unix_server")
        async with connect(server.url) as rt:
            yield rt


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared_box(any_runtime: Any) -> AsyncIterator[Any]:
    """One running busybox box of ``any_runtime`` (a Box or a RemoteBox), named ``parity-box``."""
    box = await any_runtime.create(image="busybox", name=SHARED, env=SHARED_ENV)
    try:
        await box.start()
        yield box
    finally:
        await any_runtime.remove(box.id, force=True)
