"""Pytest fixtures for real-registry tests; import them into a conftest.py::

    from tests.support.fixtures import fresh_registry, registry, tls_registry  # noqa: F401

- ``registry`` (session): plain-HTTP :class:`RegistryServer` on 127.0.0.1 (hutch talks plain HTTP
  to loopback registries by default, so no config is needed).
- ``tls_registry`` (session): :class:`TlsRegistry`, TLS with a throw-away CA + token auth
  (``.username``/``.password``/``.auth``, ``.ca_file``, ``.tokens.hits``).
- ``fresh_registry`` (per test): a plain registry of its own, for tests that stop/restart it or
  tamper with its storage.

All skip with a clear message when ``docker-registry`` is not installed (and fail when the
``CI`` environment variable is set, so CI cannot pass without running them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.registry import (
    DOCKER_REGISTRY,
    RegistryServer,
    TlsRegistry,
    registry_available,
    start_tls_registry,
)


def _require_registry() -> None:
    if not registry_available():
        if os.environ.get("CI"):  # a green CI must not hide a missing install step
            pytest.fail(
                f"{DOCKER_REGISTRY} is not installed on CI (apt-get install docker-registry)"
            )
        pytest.skip(
            f"{DOCKER_REGISTRY} is not installed (apt-get install docker-registry); "
            "real-registry tests need it"
        )


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    _require_registry()
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def fresh_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    _require_registry()
    with RegistryServer(tmp_path_factory.mktemp("fresh-registry")) as server:
        yield server


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    _require_registry()
    reg = start_tls_registry(tmp_path_factory.mktemp("tls-registry"))
    try:
        yield reg
    finally:
        reg.stop()


__all__ = ["fresh_registry", "registry", "tls_registry"]
