from __future__ import annotations

import pytest

from kiteq.core.errors import ConfigError
from kiteq.store.memory import MemoryStore
from kiteq.store.rocksdb import RocksDBStore
from kiteq.store.url import MySQLOptions, describe, mysql_options, open_store


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
        ("rocksdb://./db/x?cacheMB=16", "rocksdb://./db/x?fsync=batch"),
        ("rocksdb://./db/x?cacheMB=64&fsync=never", "rocksdb://./db/x?fsync=never&cacheMB=64"),
    ],
)
def test_rocksdb_paths_and_fsync(url: str, description: str) -> None:
    store = open_store(url)
    assert isinstance(store, RocksDBStore)
    assert store.description == description


def test_rocksdb_description_round_trips() -> None:
    for url in (
        "rocksdb://./db/x?fsync=never",
        "rocksdb:///var/lib/kiteq?fsync=batch",
        "rocksdb://./db/x?fsync=batch&cacheMB=2",
    ):
        assert open_store(open_store(url).description).description == url


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("rocksdb://./db?fsync=sometimes", "fsync"),
        ("rocksdb://./db?fsyn=never", "fsyn"),
        ("rocksdb://./db?fsync=batch&fsync=never", "fsync"),
        ("rocksdb://", "path"),
        ("rocksdb://./db?cacheMB=0", "cacheMB"),
        ("rocksdb://./db?cacheMB=big", "cacheMB"),
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


def test_mysql_defaults_and_every_parameter() -> None:
    defaults = mysql_options("mysql://127.0.0.1")
    assert defaults == MySQLOptions(host="127.0.0.1")
    assert (defaults.port, defaults.user, defaults.password, defaults.db) == (
        3306,
        "root",
        "",
        "kite",
    )
    assert (defaults.shardnum, defaults.batch_update_size, defaults.batch_del_size) == (
        4,
        1000,
        1000,
    )
    assert (defaults.flush_seconds, defaults.max_conn, defaults.timeout) == (1.0, 20, 30.0)
    assert (defaults.auto_create, defaults.kite_server) == (False, None)

    full = mysql_options(
        "mysql://kite:s%40cret@db.example:3307?db=kq&shardnum=16&batchUpdateSize=50"
        "&batchDelSize=70&flushSeconds=0.25&maxConn=3&timeout=5&autoCreate=true"
        "&kiteServer=broker-a"
    )
    assert full == MySQLOptions(
        host="db.example",
        port=3307,
        user="kite",
        password="s@cret",
        db="kq",
        shardnum=16,
        batch_update_size=50,
        batch_del_size=70,
        flush_seconds=0.25,
        max_conn=3,
        timeout=5.0,
        auto_create=True,
        kite_server="broker-a",
    )


def test_mysql_accepts_kiteqs_query_credentials_and_a_path_db() -> None:
    kiteq = mysql_options("mysql://master:3306?db=kite&username=root&password=pw&shardnum=2")
    assert (kiteq.user, kiteq.password, kiteq.db, kiteq.shardnum) == ("root", "pw", "kite", 2)
    assert mysql_options("mysql://h/kq").db == "kq"
    assert mysql_options("mysql://h?kiteServer=").kite_server == ""
    assert mysql_options("mysql://h?flushSeconds=0").flush_seconds == 0.0


def test_mysql_store_is_built_lazily_and_described_without_credentials() -> None:
    store = open_store("mysql://root:hunter2@127.0.0.1:3306?db=kite&shardnum=4&flushSeconds=0.5")
    assert store.durable
    assert store.description == (
        "mysql://127.0.0.1:3306?db=kite&shardnum=4&batchUpdateSize=1000&batchDelSize=1000"
        "&flushSeconds=0.5&maxConn=20&timeout=30&autoCreate=false"
    )
    assert "hunter2" not in store.description
    # the description is a URL that builds the same store (minus the credentials)
    assert open_store(store.description).description == store.description


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://h?shardnum=3", "shardnum must divide 16"),
        ("mysql://h?shardnum=32", "shardnum must divide 16"),
        ("mysql://h?shardnum=0", "shardnum"),
        ("mysql://h?batchUpdateSize=0", "batchUpdateSize"),
        ("mysql://h?batchDelSize=many", "batchDelSize"),
        ("mysql://h?flushSeconds=-1", "flushSeconds"),
        ("mysql://h?flushSeconds=nan", "flushSeconds"),
        ("mysql://h?maxConn=0", "maxConn"),
        ("mysql://h?timeout=0", "timeout"),
        ("mysql://h?autoCreate=yes", "autoCreate"),
        ("mysql://h?db=kite-prod", "parameter db"),
        ("mysql://h/a?db=b", "parameter db given twice"),
        ("mysql://u@h?username=v", "username given twice"),
        ("mysql://u:p@h?password=q", "password given twice"),
        ("mysql://h?user=a&username=b", "user given twice"),
        ("mysql://h?shardNum=4", "unknown parameter 'shardNum'"),
        ("mysql://h:99999", "port"),
        ("mysql://?db=kite", "needs a host"),
        ("mysql://master:3306,slave:3306?db=kite", "slave"),
        ("mysql://h?kiteServer=" + "x" * 256, "kiteServer"),
    ],
)
def test_bad_mysql_urls_name_the_parameter(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        open_store(url)


def test_mysql_errors_never_show_the_password() -> None:
    for url in ("mysql://root:hunter2@h?shardnum=3", "mysql://h?password=hunter2&maxConn=0"):
        with pytest.raises(ConfigError) as info:
            open_store(url)
        assert "hunter2" not in str(info.value)


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


def test_store_ownership_says_who_owns_and_who_shares_without_parsing_outside() -> None:
    from kiteq.store.url import store_ownership

    mine = store_ownership("mysql://root@DB:3306?db=kite&shardnum=4", "10.0.0.1:13800")
    assert mine.url == "mysql://root@DB:3306?db=kite&shardnum=4&kiteServer=10.0.0.1%3A13800"
    assert (mine.owner, mine.derived, mine.adopts_host_rows) == ("10.0.0.1:13800", True, True)
    assert mine.sharing == "mysql://db:3306/kite?shardnum=4"
    named = store_ownership("mysql://other@db/kite?shardnum=4&kiteServer=b1", "10.0.0.2:1")
    assert (named.url, named.owner, named.derived) == (
        "mysql://other@db/kite?shardnum=4&kiteServer=b1",
        "b1",
        False,
    )
    assert named.sharing == mine.sharing
    assert not named.adopts_host_rows
    for url in ("rocksdb://./db/x", "memory://"):
        alone = store_ownership(url, "h:1")
        assert (alone.url, alone.owner, alone.derived, alone.sharing) == (url, "h:1", True, None)
        assert not alone.adopts_host_rows
