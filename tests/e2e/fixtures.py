"""Broker-process fixtures shared by tests/e2e and tests/broker (their conftests import them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._servers import unavailable
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.store import mariadb


@pytest.fixture
def launch() -> Iterator[Callable[..., BrokerProcess]]:
    """Start a broker process: ``launch(config, **BrokerProcess options)``; each one
    started is stopped after the test."""
    started: list[BrokerProcess] = []

    def start(config: Path, **options: Any) -> BrokerProcess:
        process = BrokerProcess(config, **options)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop_quietly()


@pytest.fixture
def broker(tmp_path: Path, launch: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A real broker process on RocksDB (fsync=batch) in a temporary directory."""
    return launch(write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch"))


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """A store URL on a fresh set of 4 MariaDB shard databases, dropped afterwards."""
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(4) as prefix:
        yield mariadb.url(prefix, shardnum=4, flushSeconds=0.05)
