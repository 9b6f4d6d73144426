"""Shared fixtures. VM tests share one booted box per session where the behaviour allows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

# the real docker-registry fixtures (tests/support/fixtures.py), for every test folder
from tests.support.fixtures import fresh_registry, registry, tls_registry  # noqa: F401

# the real `hutch serve` processes (tests/support/server.py), for tests/server and tests/parity
from tests.support.server import tcp_server, unix_server  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # One event loop for the whole session, so a session-scoped box can serve every test.
    session_loop = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if pytest_asyncio.is_async_test(item):
            item.add_marker(session_loop, append=False)


@pytest.fixture(scope="session")
def manifest():  # type: ignore[no-untyped-def]
    """The set-up artifacts. Missing artifacts fail loudly: `make test` runs `hutch setup` first."""
    from hutch.paths import HutchPaths
    from hutch.setup import load_manifest

    return load_manifest(HutchPaths.default())


@pytest.fixture(scope="session")
def agent_binary(manifest) -> Path:  # type: ignore[no-untyped-def]
    return Path(manifest.agent)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def box(manifest) -> AsyncIterator[object]:  # type: ignore[no-untyped-def]
    """One running busybox box shared by the tests that don't change its global state."""
    import hutch

    async with hutch.Box("busybox", cpus=2, memory_mib=256) as b:
        yield b


def hutch_cli(
    *args: str,
    timeout: float = 300,
    env_extra: dict[str, str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the installed `hutch` console script of this venv."""
    exe = Path(sys.executable).parent / "hutch"
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [str(exe), *args], capture_output=True, timeout=timeout, env=env, input=input, check=False
    )
