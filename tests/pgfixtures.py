"""pytest fixtures for a real Postgres: one cluster per test session (per xdist worker), a database per test.

Loaded from tests/conftest.py (``pytest_plugins``). Tests that need Postgres take ``pg_url`` (an
empty database of their own) or ``postgres_server`` (to stop, restart or make databases). When the
binaries are missing the tests are skipped with how to install them, unless the run asks for them
(``DELEGATE_AGENT_REQUIRE_POSTGRES=1``, as CI does), where that is an error.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.pgserver import PostgresServer, pg_bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster on a free loopback port for this session (stopped and removed at its end)."""
    bindir = pg_bindir()
    if bindir is None:
        reason = "PostgreSQL is not installed: run tools/install-test-tools.sh (make test does)"
        if os.environ.get("DELEGATE_AGENT_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """The URL of a fresh, empty database (about 40 ms to make), dropped after the test."""
    url = await postgres_server.create_database()
    yield url
    await postgres_server.drop_database(url)
