from __future__ import annotations

import pytest

from kiteq.core.errors import ConfigError
from kiteq.store.memory import MemoryStore
from kiteq.store.rocksdb import RocksDBStore
from kiteq.store.url import describe, open_store


def test_memory_defaults_and_maxcap() -> None:
    assert open_store("memory://").description == "memory://?maxcap=500000"
    store = open_store("memory://?initcap=100000&maxcap=20")
    assert isinstance(store, MemoryStore)
    assert store.description == "memory://?maxcap=20"


@pytest.mark.parametrize(
    ("url", "description"),
    [
        ("rocksdb://./db/x", "rocksdb://./db/x?fsync=batch"),
        ("rocksdb://db/x?fsync=never", "rocksdb://db/x?fsync=never"),
        ("rocksdb:///var/lib/kiteq?fsync=always", "rocksdb:///var/lib/kiteq?fsync=always"),
        ("rocksdb://./my%20db", "rocksdb://./my db?fsync=batch"),
    ],
)
def test_rocksdb_paths_and_fsync(url: str, description: str) -> None:
    store = open_store(url)
    assert isinstance(store, RocksDBStore)
    assert store.description == description


def test_rocksdb_description_round_trips() -> None:
    for url in ("rocksdb://./db/x?fsync=never", "rocksdb:///var/lib/kiteq?fsync=batch"):
        assert open_store(open_store(url).description).description == url


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("rocksdb://./db?fsync=sometimes", "fsync"),
        ("rocksdb://./db?fsyn=never", "fsyn"),
        ("rocksdb://./db?fsync=batch&fsync=never", "fsync"),
        ("rocksdb://", "path"),
        ("memory://?maxcap=0", "maxcap"),
        ("memory://?maxcap=lots", "maxcap"),
        ("memory://?initcap=-1", "initcap"),
        ("memory://?maxcap", "malformed"),
        ("memory://somewhere", "path"),
        ("redis://localhost", "scheme"),
        ("./db/x", "scheme"),
    ],
)
def test_bad_urls_name_the_problem(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        open_store(url)


def test_mysql_is_not_available_yet() -> None:
    with pytest.raises(ConfigError, match=r"^mysql:// store is not available yet \(issue #6\)$"):
        open_store("mysql://root:secret@127.0.0.1:3306?db=kite&shardnum=4")


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        open_store("redis://user:hunter2@localhost")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "mysql://root:secret@127.0.0.1:3306?db=kite&shardnum=4",
            "mysql://root:***@127.0.0.1:3306?db=kite&shardnum=4",
        ),
        ("mysql://root:@127.0.0.1:3306?db=kite", "mysql://root:***@127.0.0.1:3306?db=kite"),
        ("mysql://root@127.0.0.1/kite", "mysql://root@127.0.0.1/kite"),
        ("mysql://h/kite?user=k&password=s3cr%40t", "mysql://h/kite?user=k&password=***"),
        ("rocksdb://./db/x?fsync=batch", "rocksdb://./db/x?fsync=batch"),
        ("memory://?maxcap=5", "memory://?maxcap=5"),
    ],
)
def test_describe_hides_passwords(url: str, shown: str) -> None:
    assert describe(url) == shown
