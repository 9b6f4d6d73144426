"""Fixtures of the real-registry tests (see tests/support/fixtures.py)."""

from tests.support.fixtures import fresh_registry, registry, tls_registry  # noqa: F401
