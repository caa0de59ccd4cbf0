"""Store fixtures: one ``store`` fixture parametrised over every backend, so the contract
tests in ``test_contract.py`` run against each of them.

Adding a backend means adding its name to ``BACKENDS`` and a branch in ``backend`` that
builds its URL (or calls ``unavailable`` when its server is absent).

MySQL runs against a real MariaDB (``tests/store/mariadb.py``): one set of databases per
test session, emptied before each test and dropped at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import pytest

from kiteq.store.base import MessageStore
from kiteq.store.rocksdb import RocksDBStore
from tests._servers import unavailable
from tests.store import mariadb
from tests.store.helpers import Backend, opened

BACKENDS: Final = ["memory", "rocksdb", "mysql"]
MYSQL_SHARDNUM: Final = mariadb.SHARDNUM


@pytest.fixture(scope="session")
def mysql_prefix() -> Iterator[str]:
    """Databases for the MySQL conformance runs (schema created once per session)."""
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(MYSQL_SHARDNUM) as prefix:
        yield prefix


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    match name:
        case "memory":
            return Backend(name, "memory://?maxcap=100000")
        case "rocksdb":
            return Backend(name, f"rocksdb://{tmp_path / 'db'}?fsync=batch")
        case "mysql":
            prefix: str = request.getfixturevalue("mysql_prefix")
            mariadb.clear(prefix, MYSQL_SHARDNUM)
            # flushSeconds > 0: bookkeeping writes take the deferred path in every test;
            # kiteServer= (empty): the store owns the contract's records, saved without one
            return Backend(
                name,
                mariadb.url(
                    prefix, shardnum=MYSQL_SHARDNUM, flushSeconds=0.05, maxConn=8, kiteServer=""
                ),
            )
        case _:
            raise AssertionError(f"no URL for backend {name}")


@pytest.fixture
async def rocks(tmp_path: Path) -> AsyncIterator[RocksDBStore]:
    async with opened(RocksDBStore(str(tmp_path / "db"))) as store:
        yield store


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[MessageStore]:
    async with opened(backend.build()) as store:
        yield store
