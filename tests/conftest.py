"""
The database the suite runs against: $PGWS_TEST_DB_URI when set, else a throwaway PostgreSQL
started once per session by the same launcher as `db-uri = "embedded"`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def db_uri() -> Iterator[str]:
    uri = os.environ.get("PGWS_TEST_DB_URI")
    if uri:
        yield uri
        return
    from pgws._embedded import EmbeddedPostgres  # only when no database is given

    server = EmbeddedPostgres(port=0, throwaway=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def db(db_uri: str):
    from support import Db

    conn = Db(db_uri)
    yield conn
    conn.close()
