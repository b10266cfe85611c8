"""PostgreSQL fixtures: the server from ``BIOTEMPLATE_TEST_PG``, one schema per test.

The development and CI machines run PostgreSQL at 127.0.0.1:5432 (trust authentication,
database ``test``). Without a server these tests skip with one line saying how to start
one; ``BIOTEMPLATE_REQUIRE_PG=1`` (set by ``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
SERVER = os.environ.get("BIOTEMPLATE_TEST_PG", DEFAULT_URL)
REQUIRE = "BIOTEMPLATE_REQUIRE_PG"


def _unavailable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'biotemplate[postgres]')"
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error:
        host = urlsplit(SERVER).netloc.rsplit("@", 1)[-1]
        return (f"no PostgreSQL server answers at {host}: start one (apt-get install "
                "postgresql; pg_ctlcluster 15 main start) or set BIOTEMPLATE_TEST_PG")
    return None


_WHY = _unavailable()


@pytest.fixture(scope="session")
def pg_server() -> str:
    if _WHY is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but {_WHY}")
        pytest.skip(f"PostgreSQL tests skipped: {_WHY}")
    return SERVER


def with_schema(server: str, schema: str) -> str:
    parts = urlsplit(server)
    query = f"{parts.query}&schema={schema}" if parts.query else f"schema={schema}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def drop_schema(server: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A store URL in a fresh schema of its own, dropped after the test."""
    schema = f"bt_test_{secrets.token_hex(6)}"
    yield with_schema(pg_server, schema)
    drop_schema(pg_server, schema)


@pytest.fixture
def store(pg_url: str, policy, keys, clock):  # type: ignore[no-untyped-def]
    """The conftest ``store`` fixture, on PostgreSQL: tests/pg/test_contract_pg.py runs
    the contract tests that need no file of the store against it."""
    import contextlib

    import biotemplate as bt
    from tests.conftest import DIM, MODEL

    s = bt.TemplateStore.create(pg_url, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    yield s
    with contextlib.suppress(Exception):
        s.close()


@pytest.fixture(params=["exact", "hnsw"])
def sstore(request: pytest.FixtureRequest, pg_url: str, policy, keys, clock):  # type: ignore[no-untyped-def]
    """tests/unit/test_store.py's ``sstore`` (exact or HNSW search), on PostgreSQL."""
    import biotemplate as bt
    from tests.conftest import DIM

    params = bt.IndexParams(exact_cutoff=0) if request.param == "hnsw" else None
    s = bt.TemplateStore.create(pg_url, dim=DIM, model="test-model-v1", policy=policy,
                                key_provider=keys, clock=clock, index_params=params)
    yield s
    s.close()
