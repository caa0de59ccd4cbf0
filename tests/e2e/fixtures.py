"""Broker-process fixtures shared by tests/e2e and tests/broker (their conftests import them)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest

from tests._servers import unavailable
from tests._servers.zookeeper import ManagedZooKeeper
from tests.e2e.broker_process import BrokerProcess, write_config, write_zk_config, zk_registry
from tests.store import mariadb

# the zk_config fixture: write a cluster config with these extra keys, return its path
ZkConfig = Callable[[Mapping[str, object] | None], Path]


class StartBroker(Protocol):
    """The start_broker fixture: a broker in a directory of its own (see there)."""

    def __call__(
        self,
        extra: Mapping[str, object],
        *,
        store: Literal["memory", "rocksdb"] = "memory",
        secrets: Mapping[str, str] | None = None,
        **options: Any,
    ) -> BrokerProcess: ...


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
def start_broker(tmp_path: Path, launch: Callable[..., BrokerProcess]) -> StartBroker:
    """Start a broker of cluster e2e with the config keys *extra* (and group *secrets*), in a
    directory of its own (several per test): ``start_broker(extra, store=..., secrets=...,
    **BrokerProcess options)``; *store* "rocksdb" keeps its messages in that directory."""
    numbers = itertools.count()

    def start(
        extra: Mapping[str, object],
        *,
        store: Literal["memory", "rocksdb"] = "memory",
        secrets: Mapping[str, str] | None = None,
        **options: Any,
    ) -> BrokerProcess:
        directory = tmp_path / f"broker{next(numbers)}"
        directory.mkdir()
        db = "memory://" if store == "memory" else f"rocksdb://{directory / 'db'}"
        return launch(write_config(directory, db=db, extra=extra, secrets=secrets), **options)

    return start


@pytest.fixture
def zk_config(zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path) -> ZkConfig:
    """Write the config of a cluster ``e2e`` registered in this test's ZooKeeper chroot, on
    RocksDB (fsync=batch) in a temporary directory: ``zk_config(extra keys)``."""

    def write(extra: Mapping[str, object] | None = None) -> Path:
        return write_zk_config(
            tmp_path,
            zk_registry(zookeeper.hosts + zk.chroot),
            db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
            extra=extra,
        )

    return write


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """A store URL on a fresh set of 4 MariaDB shard databases, dropped afterwards."""
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(4) as prefix:
        yield mariadb.url(prefix, shardnum=4, flushSeconds=0.05)
