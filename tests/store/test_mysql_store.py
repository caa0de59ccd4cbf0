"""What only the MySQL backend promises: KiteQ's sharding, a recover index the recover
query really uses, the schema command, ack after COMMIT, group commit with multi-row
statements, flushSeconds, work kept off the event loop, ownership by kite_server,
reconnecting after the server dropped connections, and durability across a SIGKILL.

All against a real MariaDB (tests/store/mariadb.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.exc import OperationalError

from kiteq.core.errors import ConfigError, StoreError, StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._mysql_schema import SHARDNUMS, Layout, slot_of
from kiteq.store.base import DeadLetter, DlqFilter, HistoryEvent, Rescheduled, Saved
from kiteq.store.mysql import MySQLStore, page_keys_sql, schema_main
from kiteq.store.url import open_store
from tests.store import mariadb
from tests.store.helpers import (
    NOW,
    acked,
    acked_before_sigkill,
    dead,
    ids,
    only_store_threads,
    opened,
    pending,
    record,
)
from tests.waiting import wait_until

HEX = "0123456789abcdef"


@pytest.fixture
def prefix(mysql_prefix: str) -> str:
    """The session's databases (shardnum 4), emptied."""
    mariadb.clear(mysql_prefix, mariadb.SHARDNUM)
    return mysql_prefix


@pytest.fixture
def server() -> None:
    """For tests that make their own databases: the server must be there."""
    if not mariadb.available():
        from tests._servers import unavailable

        unavailable("MariaDB")


def mysql(url: str) -> MySQLStore:
    store = open_store(url)
    assert isinstance(store, MySQLStore)
    return store


def url_of(prefix: str, **params: object) -> str:
    params.setdefault("shardnum", mariadb.SHARDNUM)
    params.setdefault("kiteServer", "")
    return mariadb.url(prefix, **params)


def with_id_ending(digit: str, **fields: Any) -> StoredMessage:
    """A record whose id ends in *digit* (so its slot is known), unique otherwise."""
    return record(message_id=uuid.uuid4().hex[:-1] + digit, **fields)


def rows_where(sql: str, *args: object) -> list[tuple[Any, ...]]:
    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


# -- sharding ----------------------------------------------------------------------------


def test_slot_is_the_last_hex_digit_in_either_case() -> None:
    assert [slot_of("a" * 31 + c) for c in HEX] == list(range(16))
    assert [slot_of("a" * 31 + c) for c in HEX.upper()] == list(range(16))
    assert slot_of("z") == ord("z") % 16
    assert slot_of("") == 0
    # KiteQ's default 4 x 4: ids ending in e live in kite_3.kite_msg_2
    assert Layout("kite", 4).route("f" * 31 + "e") == (3, 2)
    with pytest.raises(ValueError, match="shardnum must divide 16"):
        Layout("kite", 3)


@pytest.mark.parametrize("shardnum", SHARDNUMS)
async def test_records_live_in_database_slot_div_t_table_slot_mod_t(
    server: None, shardnum: int
) -> None:
    per_shard = 16 // shardnum
    with mariadb.databases(shardnum) as prefix:
        records = [with_id_ending(c) for c in HEX + HEX.upper()]
        async with opened(mysql(url_of(prefix, shardnum=shardnum))) as store:
            assert await store.save(records) == [Saved.STORED] * 32
            for r in records:
                assert await store.get(r.message_id) == r
            assert ids(await store.page_due(NOW, 100)) == sorted(ids(records))
        found: dict[str, tuple[int, int]] = {}
        for shard in range(shardnum):
            for table in range(per_shard):
                for (mid,) in rows_where(
                    f"SELECT message_id FROM `{prefix}_{shard}`.`kite_msg_{table}`"
                ):
                    found[mid] = (shard, table)
        for r in records:
            h = int(r.message_id[-1], 16)
            assert found[r.message_id] == (h // per_shard, h % per_shard), r.message_id
        assert len(found) == 32


# -- the recover index -------------------------------------------------------------------


def explain(sql: str, args: tuple[object, ...]) -> list[dict[str, Any]]:
    with mariadb.connect() as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("EXPLAIN " + sql, args)
        return list(cur.fetchall())


async def test_page_due_reads_idx_recover_in_order_without_a_sort(prefix: str) -> None:
    async with opened(mysql(url_of(prefix, kiteServer="me"))) as store:
        mine = [record(ndt=NOW - i % 97) for i in range(3000)]
        for r in mine:
            r.kite_server = "me"
        others = [record(ndt=NOW - i % 50) for i in range(1000)]
        for r in others:
            r.kite_server = "someone-else"
        tx = [record(commit=False, ndt=NOW - 5) for _ in range(500)]
        for r in tx:
            r.kite_server = "me"
        await store.save([*mine, *others, *tx])
        tables = [table for _, table in store._slots]
    for table in tables:
        rows_where(f"ANALYZE TABLE {table}")

    # one table, the branch exactly as the store sends it (the outer ORDER BY sorts at
    # most its limit of keys, from a derived table)
    one = page_keys_sql([(0, tables[0])])
    args: tuple[object, ...] = ("me", NOW, NOW - 50.0, NOW - 50.0, "8", 100, 100)
    [plan] = [p for p in explain(one, args) if p["table"].startswith("kite_msg")]
    assert plan["key"] == "idx_recover", plan
    assert plan["type"] == "range"
    assert "Using index" in plan["Extra"]
    assert "filesort" not in plan["Extra"]

    # the 16-branch query of page_due, first page and with a cursor
    sql = page_keys_sql(list(enumerate(tables)))
    for cursor in ((-1.0, ""), (NOW - 20.0, "8")):
        branch = ("me", NOW, cursor[0], cursor[0], cursor[1], 100)
        plans = explain(sql, (*branch * 16, 100))
        scans = [p for p in plans if (p["table"] or "").startswith("kite_msg")]
        assert len(scans) == 16
        for p in scans:
            assert p["key"] == "idx_recover", p
            assert p["type"] == "range", p
            assert "filesort" not in p["Extra"], p

    # and each branch stops after its limit: few rows read per table
    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute("ANALYZE FORMAT=JSON " + one, args)
        (analyzed,) = cur.fetchone() or ("{}",)
    tree = json.loads(analyzed)
    table_stats = _find(tree, "table")
    assert table_stats["key"] == "idx_recover"
    assert table_stats["r_rows"] <= 101


def _find(tree: Any, key: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        if key in tree and isinstance(tree[key], dict) and "key" in tree[key]:
            found: dict[str, Any] = tree[key]
            return found
        for value in tree.values():
            with contextlib.suppress(KeyError):
                return _find(value, key)
    if isinstance(tree, list):
        for value in tree:
            with contextlib.suppress(KeyError):
                return _find(value, key)
    raise KeyError(key)


# -- the schema command ------------------------------------------------------------------


def test_schema_command_checks_creates_and_repairs(
    server: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with mariadb.databases(2, schema=False) as prefix:
        url = url_of(prefix, shardnum=2)
        assert schema_main(["--check", url]) == 1
        err = capsys.readouterr().err
        assert f"missing database {prefix}_0" in err
        assert f"missing database {prefix}_1" in err

        assert schema_main([url]) == 0
        out = capsys.readouterr().out
        assert f"created database {prefix}_0" in out
        assert "schema complete: 2 database(s)" in out
        assert schema_main(["--check", url]) == 0
        assert schema_main([url]) == 0  # idempotent: nothing to create
        assert "created" not in capsys.readouterr().out

        rows_where(f"DROP INDEX idx_recover ON `{prefix}_1`.`kite_msg_5`")
        rows_where(f"DROP TABLE `{prefix}_0`.`kite_msg_dlq`")
        rows_where(f"DROP TABLE `{prefix}_1`.`kite_msg_dedup`")
        rows_where(f"DROP INDEX idx_dedup_until ON `{prefix}_0`.`kite_msg_dedup`")
        assert schema_main(["--check", url]) == 1
        err = capsys.readouterr().err
        assert f"missing index {prefix}_1.kite_msg_5.idx_recover (kite_server, commit," in err
        assert f"missing table {prefix}_0.kite_msg_dlq" in err
        assert f"missing table {prefix}_1.kite_msg_dedup" in err
        assert f"missing index {prefix}_0.kite_msg_dedup.idx_dedup_until (remember_until)" in err
        assert schema_main([url]) == 0
        out = capsys.readouterr().out
        assert f"created index {prefix}_1.kite_msg_5.idx_recover" in out
        assert f"created table {prefix}_0.kite_msg_dlq" in out
        assert f"created table {prefix}_1.kite_msg_dedup" in out
        assert f"created index {prefix}_0.kite_msg_dedup.idx_dedup_until" in out
        assert schema_main(["--check", url]) == 0

        # runnable as a module until the console script exists
        done = subprocess.run(
            [sys.executable, "-m", "kiteq.store.mysql", "--check", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "schema complete" in done.stdout


def test_schema_command_reports_bad_urls_and_unreachable_servers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert schema_main(["mysql://h?shardnum=3"]) == 2
    assert "shardnum must divide 16" in capsys.readouterr().err
    port = _closed_port()
    assert schema_main([f"mysql://root:hunter2@127.0.0.1:{port}?timeout=2"]) == 1
    err = capsys.readouterr().err
    assert "2003" in err
    assert "hunter2" not in err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_open_refuses_an_incomplete_schema_and_names_the_command(server: None) -> None:
    with mariadb.databases(2, schema=False) as prefix:
        store = mysql(url_of(prefix, shardnum=2))
        with pytest.raises(StoreUnavailableError) as info:
            await store.open()
        message = str(info.value)
        assert f"database {prefix}_0" in message
        assert f"kiteq-schema 'mysql://root@127.0.0.1:3306?db={prefix}&shardnum=2'" in message
        assert "autoCreate=true" in message
        await store.close()

        async with opened(mysql(url_of(prefix, shardnum=2, autoCreate="true"))) as created:
            assert await created.save([record()]) == [Saved.STORED]
        assert schema_main(["--check", url_of(prefix, shardnum=2)]) == 0


async def test_an_unreachable_server_fails_open_without_showing_the_password() -> None:
    store = mysql(f"mysql://root:hunter2@127.0.0.1:{_closed_port()}?timeout=2")
    with pytest.raises(StoreUnavailableError, match="open failed") as info:
        await store.open()
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is not None
    await store.close()


# -- ack only after COMMIT ---------------------------------------------------------------


async def test_a_failed_transaction_fails_every_record_of_it_and_stores_none(
    prefix: str,
) -> None:
    # slot 0 lives in {prefix}_0.kite_msg_0: make every insert there with this topic fail
    rows_where(
        f"CREATE TRIGGER `{prefix}_0`.poison BEFORE INSERT ON `{prefix}_0`.`kite_msg_0` "
        "FOR EACH ROW BEGIN IF NEW.topic = 'poison' THEN "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END"
    )
    async with opened(mysql(url_of(prefix))) as store:
        same_database = [with_id_ending(d) for d in "0123"]  # {prefix}_0, tables 0-3
        poison = with_id_ending("0", topic="poison")
        elsewhere = [with_id_ending(d) for d in "4c"]  # {prefix}_1 and {prefix}_3
        outcomes = await store.save([*same_database, poison, *elsewhere])
        failed = outcomes[:5]
        assert all(isinstance(o, StoreUnavailableError) for o in failed), outcomes
        assert "injected failure" in str(failed[0])
        assert outcomes[5:] == [Saved.STORED, Saved.STORED]
        for r in [*same_database, poison]:
            assert await store.get(r.message_id) is None
        assert await store.backlog() == {"trade": 2}
        # the database is fine again for the next transaction
        assert await store.save(same_database) == [Saved.STORED] * 4


async def test_a_failed_dead_letter_changes_neither_the_message_nor_the_dlq(
    prefix: str,
) -> None:
    # a dead letter for the group "poison" cannot be inserted in {prefix}_0's DLQ
    rows_where(
        f"CREATE TRIGGER `{prefix}_0`.poison_letter BEFORE INSERT ON `{prefix}_0`.`kite_msg_dlq` "
        "FOR EACH ROW BEGIN IF NEW.group_id = 'poison' THEN "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END"
    )
    try:
        async with opened(mysql(url_of(prefix))) as store:
            kept, gone = with_id_ending("0"), with_id_ending("1")
            await store.save([kept, gone])
            for r, keep in ((kept, True), (gone, False)):
                state = dataclasses.replace(
                    r, groups={"g1": dead(3), "poison": dead(3), "g2": pending(1, NOW + 9)}
                )
                letters = [
                    DeadLetter(state, "deliver_limit", NOW, "g1", keep),
                    DeadLetter(state, "deliver_limit", NOW, "poison", keep),
                ]
                with pytest.raises(StoreUnavailableError, match="injected failure"):
                    await store.dead_letter(letters)
                # the letter of g1 and the update (or removal) were in the same transaction
                assert await store.get(r.message_id) == r
                assert await store.get_dead_letters(r.message_id) == []
            assert await store.dlq_size() == {}
            assert await store.backlog() == {"trade": 2}
    finally:
        rows_where(f"DROP TRIGGER `{prefix}_0`.poison_letter")


async def test_a_failed_commit_is_never_acknowledged(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(mysql(url_of(prefix))) as store:
        real_commit = SAConnection.commit

        def failing_commit(self: SAConnection) -> None:
            self.rollback()
            raise OperationalError(
                "COMMIT", {}, pymysql.err.OperationalError(1180, "injected: COMMIT failed")
            )

        monkeypatch.setattr(SAConnection, "commit", failing_commit)
        records = [record() for _ in range(20)]
        outcomes = await asyncio.gather(*(store.save([r]) for r in records))
        assert all(isinstance(o[0], StoreUnavailableError) for o in outcomes)
        with pytest.raises(StoreUnavailableError, match="COMMIT failed"):
            await store.delete(records)
        monkeypatch.setattr(SAConnection, "commit", real_commit)
        for r in records:
            assert await store.get(r.message_id) is None
        assert await store.backlog() == {}


async def test_a_record_the_columns_cannot_hold_fails_alone(prefix: str) -> None:
    async with opened(mysql(url_of(prefix))) as store:
        good = [with_id_ending("2") for _ in range(3)]
        long_type = dataclasses.replace(good[0].message, message_id=uuid.uuid4().hex[:-1] + "2")
        long_type.message_type = "t" * 256
        bad = [
            StoredMessage(message=long_type, publish_time=NOW),
            record(message_id="é" * 32),
            record(message_id="0" * 33),
            dataclasses.replace(with_id_ending("2"), publish_time=float("nan")),
        ]
        outcomes = await store.save([good[0], *bad, good[1], good[2]])
        assert outcomes[0] == outcomes[5] == outcomes[6] == Saved.STORED
        for outcome, why in zip(
            outcomes[1:5], ["message_type", "id", "id", "publish_time"], strict=True
        ):
            assert isinstance(outcome, StoreError)
            assert not isinstance(outcome, StoreUnavailableError)
            assert why in str(outcome)
        # ids that cannot be stored are simply absent for every other call
        odd = record(message_id="é" * 32)
        assert await store.commit(odd.message_id) is None
        assert await store.rollback(odd.message_id) is None
        assert await store.redrive([(odd.message_id, "g")], NOW) == []
        await store.delete([odd])
        await store.reschedule([Rescheduled(odd, NOW)])
        await store.dead_letter([DeadLetter(odd, "x" * 500, NOW)])
        # oversized history fields are cut to their columns, never failing the write
        await store.append_history(
            [
                HistoryEvent(good[0].message_id, NOW, "k" * 100, "g" * 300, "c" * 300, 2**40),
                HistoryEvent(odd.message_id, NOW, "published"),
            ]
        )
        [event] = await store.get_history(good[0].message_id)
        assert (len(event.kind), len(event.group), len(event.connection)) == (32, 255, 255)
        assert await store.backlog() == {"trade": 3}


async def test_a_stored_ack_means_committed_for_any_other_connection(prefix: str) -> None:
    async with opened(mysql(url_of(prefix))) as store:
        r = with_id_ending("5")
        assert await store.save([r]) == [Saved.STORED]
        # no transaction of ours is open: a fresh connection sees the row at once
        assert rows_where(
            f"SELECT message_id FROM `{prefix}_1`.`kite_msg_1` WHERE message_id = %s",
            r.message_id,
        ) == [(r.message_id,)]


# -- group commit and multi-row statements -----------------------------------------------


class _Statements:
    """Counts the statements PyMySQL really sends, by their first word."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        self._lock = threading.Lock()
        real: Any = getattr(pymysql.cursors.Cursor, "_query")  # noqa: B009 - private

        def spy(cursor: pymysql.cursors.Cursor, q: str | bytes | bytearray) -> int:
            head = q[:32] if isinstance(q, str) else bytes(q[:32]).decode("latin-1")
            with self._lock:
                self.sent.append(head.lstrip("( ").split(None, 1)[0].upper())
            sent: int = real(cursor, q)
            return sent

        monkeypatch.setattr(pymysql.cursors.Cursor, "_query", spy)

    def count(self, word: str) -> int:
        with self._lock:
            return self.sent.count(word)

    def clear(self) -> None:
        with self._lock:
            self.sent.clear()


async def test_concurrent_calls_share_transactions_and_multi_row_statements(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(mysql(url_of(prefix, flushSeconds=0))) as store:
        await store.save([record()])  # connect outside the counts
        statements = _Statements(monkeypatch)
        before = store.write_transactions
        records = [with_id_ending("0", body=bytes(1024)) for _ in range(1000)]
        outcomes = await asyncio.gather(*(store.save([r]) for r in records))
        assert outcomes == [[Saved.STORED]] * 1000
        # all in one table: one transaction, ~1 MB multi-row INSERT statements
        assert store.write_transactions - before <= 2
        assert 1 <= statements.count("INSERT") <= 4

        statements.clear()
        changes = [
            Rescheduled(dataclasses.replace(r, deliver_count=1, next_deliver_time=NOW + 9), NOW)
            for r in records
        ]
        await store.reschedule(changes)
        assert statements.count("UPDATE") == 1  # batchUpdateSize 1000: one CASE update
        got = await store.get(records[7].message_id)
        assert got is not None
        assert (got.deliver_count, got.next_deliver_time) == (1, NOW + 9)

        statements.clear()
        await store.delete(records)
        assert statements.count("DELETE") == 1  # batchDelSize 1000: one IN (...) list
        assert await store.backlog() == {"trade": 1}


async def test_batch_sizes_cap_the_rows_per_statement(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = url_of(prefix, flushSeconds=0, batchUpdateSize=7, batchDelSize=5)
    async with opened(mysql(url)) as store:
        records = [with_id_ending("3") for _ in range(20)]
        await store.save(records)
        statements = _Statements(monkeypatch)
        await store.reschedule([Rescheduled(r, NOW) for r in records])
        assert statements.count("UPDATE") == 3  # 7 + 7 + 6
        await store.delete(records)
        assert statements.count("DELETE") == 4  # 5 x 5
        assert await store.backlog() == {}


async def test_writes_of_one_call_in_several_databases_are_one_transaction_each(
    prefix: str,
) -> None:
    async with opened(mysql(url_of(prefix, flushSeconds=0))) as store:
        before = store.write_transactions
        await store.save([with_id_ending(d) for d in HEX])
        assert store.write_transactions - before == 4


async def test_duplicates_among_stored_ids_are_found_without_failing_the_batch(
    prefix: str,
) -> None:
    async with opened(mysql(url_of(prefix))) as store:
        old = [with_id_ending("7") for _ in range(3)]
        await store.save(old)
        fresh = [with_id_ending("7") for _ in range(3)]
        outcomes = await store.save([fresh[0], old[0], fresh[1], old[1], fresh[2], old[2]])
        assert outcomes == [Saved.STORED, Saved.DUPLICATE] * 3
        assert await store.backlog() == {"trade": 6}


# -- flushSeconds ------------------------------------------------------------------------


async def test_bookkeeping_waits_for_flush_seconds_or_rides_with_a_save(prefix: str) -> None:
    # flushSeconds=30: whatever completes within 10 s did not wait for the timer
    async with opened(mysql(url_of(prefix, flushSeconds=30, batchDelSize=5))) as store:
        a, b, c = (with_id_ending("9") for _ in range(3))
        assert await asyncio.wait_for(store.save([a, b, c]), 10) == [Saved.STORED] * 3

        delete = asyncio.ensure_future(store.delete([a]))
        await asyncio.sleep(0)  # the delete is queued (one loop turn, no time involved)
        assert not delete.done()
        before = store.write_transactions
        await asyncio.wait_for(store.save([with_id_ending("9")]), 10)  # same database
        await asyncio.wait_for(delete, 10)  # it rode along with the save
        assert store.write_transactions - before == 1

        many = [with_id_ending("9") for _ in range(5)]
        await store.save(many)
        await asyncio.wait_for(store.delete(many), 10)  # batchDelSize rows: written at once
        assert await store.backlog() == {"trade": 3}

    async with opened(mysql(url_of(prefix, flushSeconds=0.4))) as store:
        d = with_id_ending("9")
        await store.save([d])
        started = time.monotonic()
        await store.delete([d])
        # a lower bound: a slow machine cannot make it shorter
        assert time.monotonic() - started >= 0.35, "a lone delete waits for flushSeconds"


async def test_flush_seconds_zero_writes_bookkeeping_at_once(prefix: str) -> None:
    async with opened(mysql(url_of(prefix, flushSeconds=0))) as store:
        r = record()
        await store.save([r])
        await asyncio.wait_for(store.reschedule([Rescheduled(r, NOW)]), 10)
        await asyncio.wait_for(store.delete([r]), 10)
    # the contrast: with a timer, a lone delete is still waiting after a read's round
    # trip (with flushSeconds=0 it is written meanwhile, and the read races it)
    async with opened(mysql(url_of(prefix, flushSeconds=30))) as store:
        r = record()
        await store.save([r])
        before = store.write_transactions
        delete = asyncio.ensure_future(store.delete([r]))
        await asyncio.sleep(0)  # the delete is queued (one loop turn, no time involved)
        assert await store.get(r.message_id) is not None
        assert not delete.done()
        assert store.write_transactions == before
    await delete  # written by the close


async def test_bookkeeping_of_a_keyed_message_does_not_wait_for_flush_seconds(
    prefix: str,
) -> None:
    # issue #16: an ordering key's next message waits for this write
    # flushSeconds=30: whatever completes within 10 s did not wait for the timer
    async with opened(mysql(url_of(prefix, flushSeconds=30))) as store:
        r, plain = record(), record()
        r.message = dataclasses.replace(r.message, ordering_key="order-1")
        await store.save([r, plain])
        await asyncio.wait_for(store.reschedule([Rescheduled(r, NOW)]), 10)
        await asyncio.wait_for(store.delete([r]), 10)
        assert await store.get(r.message_id) is None
        delete = asyncio.ensure_future(store.delete([plain]))
        await asyncio.sleep(0)  # the contrast: an unkeyed one is still queued
        assert not delete.done()
    await delete  # written by the close


async def test_close_writes_queued_bookkeeping_without_waiting_for_the_timer(
    prefix: str,
) -> None:
    store = mysql(url_of(prefix, flushSeconds=30))
    await store.open()
    r = record()
    await store.save([r])
    delete = asyncio.ensure_future(store.delete([r]))
    await asyncio.sleep(0)  # the delete is queued (one loop turn, no time involved)
    assert not delete.done()
    # the timer is 30 s: a close that waited for it would not end within 10 s
    await asyncio.wait_for(store.close(), 10)
    await delete
    async with opened(mysql(url_of(prefix))) as again:
        assert await again.get(r.message_id) is None


# -- threads and pool ----------------------------------------------------------------------


async def test_every_database_call_runs_on_the_stores_threads(prefix: str) -> None:
    store = mysql(url_of(prefix, maxConn=3))
    threads: set[str] = set()

    def note(*_: object) -> None:
        threads.add(threading.current_thread().name)

    event.listen(store._engine, "before_cursor_execute", note)
    event.listen(store._engine, "connect", note)
    await store.open()
    try:
        r = record(commit=False)
        await asyncio.gather(*(store.save([record()]) for _ in range(50)), store.save([r]))
        await store.commit(r.message_id)
        await store.page_due(NOW, 10)
        await store.get(r.message_id)
        await store.reschedule([Rescheduled(r, NOW)])
        await store.dead_letter([DeadLetter(r, "expired", NOW)])
        await store.list_dlq(DlqFilter(), 10)
        await store.get_dead_letters(r.message_id)
        await store.redrive([(r.message_id, "")], NOW)
        await store.put_meta("k", b"v")
        await store.get_meta("k")
        await store.prune_history(NOW)
        assert store._engine.pool.size() == 3  # type: ignore[attr-defined]
        assert store._executor._max_workers == 3
    finally:
        await store.close()
    only_store_threads(threads)


# -- ownership ------------------------------------------------------------------------------


async def test_only_rows_of_the_stores_owner_are_paged_counted_and_listed(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(mysql(url_of(prefix, kiteServer="broker-a"))) as store:
        assert store.owner == "broker-a"
        mine = [record(ndt=NOW - 1) for _ in range(3)]
        theirs = [record(ndt=NOW - 2) for _ in range(2)]
        for r in mine:
            r.kite_server = "broker-a"
        for r in theirs:
            r.kite_server = "broker-b"
        with caplog.at_level(logging.WARNING, logger="kiteq.store.mysql"):
            await store.save([*mine, *theirs])
            await store.save([record()])  # no owner: not this store's either
        assert sum("kite_server='broker-b'" in m for m in caplog.messages) == 1
        assert sorted(ids(await store.page_due(NOW, 10))) == sorted(ids(mine))
        assert await store.backlog() == {"trade": 3}
        tx_mine, tx_theirs = record(commit=False), record(commit=False)
        tx_mine.kite_server, tx_theirs.kite_server = "broker-a", "broker-b"
        await store.save([tx_mine, tx_theirs])
        assert ids(await store.page_uncommitted(10)) == [tx_mine.message_id]
        assert await store.rollback(tx_mine.message_id) == tx_mine
        assert await store.rollback(tx_theirs.message_id) == tx_theirs
        assert await store.get(theirs[0].message_id) == theirs[0]
        await store.dead_letter([DeadLetter(mine[0], "expired", NOW)])
        await store.dead_letter([DeadLetter(theirs[0], "expired", NOW)])
        assert ids([d.record for d in await store.list_dlq(DlqFilter(), 10)]) == [
            mine[0].message_id
        ]
        assert await store.dlq_size() == {("trade", ""): 1}
        assert len(await store.get_dead_letters(theirs[0].message_id)) == 1
        await store.delete(theirs)
        assert await store.backlog() == {"trade": 2}
    # counted again from the tables when reopened
    async with opened(mysql(url_of(prefix, kiteServer="broker-a"))) as store:
        assert await store.backlog() == {"trade": 2}
        assert await store.dlq_size() == {("trade", ""): 1}


def test_the_default_owner_is_the_host_name_the_broker_stamps() -> None:
    assert mysql("mysql://127.0.0.1").owner == socket.gethostname()


async def test_rows_are_kiteqs_columns_with_documented_encodings(prefix: str) -> None:
    async with opened(mysql(url_of(prefix))) as store:
        r = with_id_ending("1", properties={"k": "v ✓"})
        r.groups = {
            "g1": acked(1, NOW - 3),
            "g2": pending(2, NOW + 10.5),
            "g3": dead(4, NOW),
            "g4": pending(),  # no attempt yet: not one of KiteQ's fail_groups
        }
        r.only_groups = ("g2", "g4")
        r.kite_server = ""
        plain = with_id_ending("1")
        await store.save([r, plain])
    rows = rows_where(
        "SELECT message_id, header, msg_type, topic, message_type, publish_group, `commit`, "
        "expired_time, deliver_limit, succ_groups, fail_groups, next_deliver_time, "
        f"group_state, only_groups FROM `{prefix}_0`.`kite_msg_1` WHERE message_id = %s",
        r.message_id,
    )
    [row] = rows
    assert json.loads(row[1]) == {"createTime": int(NOW) - 1, "properties": {"k": "v ✓"}}
    assert row[2:9] == (0x11, "trade", "pay-succ", "ps-test", 1, int(NOW) + 3600, 100)
    # KiteQ's columns, derived; then ours
    assert (json.loads(row[9]), json.loads(row[10]), row[11]) == (["g1"], ["g2", "g3"], NOW)
    assert json.loads(row[12]) == {
        "g1": ["acked", 1, NOW - 3],
        "g2": ["pending", 2, NOW + 10.5],
        "g3": ["dead", 4, NOW],
        "g4": ["pending", 0, 0.0],
    }
    assert json.loads(row[13]) == ["g2", "g4"]
    # a record no group has tried: the smallest values, no JSON built
    [empty] = rows_where(
        "SELECT succ_groups, fail_groups, group_state, only_groups "
        f"FROM `{prefix}_0`.`kite_msg_1` WHERE message_id = %s",
        plain.message_id,
    )
    assert empty == ("[]", "[]", "{}", None)


# -- dropped connections ------------------------------------------------------------------


async def test_connections_killed_by_the_server_are_replaced(prefix: str) -> None:
    store = mysql(url_of(prefix, maxConn=4, flushSeconds=0))
    connection_ids: set[int] = set()

    def on_connect(dbapi_connection: Any, _record: object) -> None:
        connection_ids.add(dbapi_connection.thread_id())

    event.listen(store._engine, "connect", on_connect)
    await store.open()
    try:
        first = [record() for _ in range(40)]
        await asyncio.gather(*(store.save([r]) for r in first), store.page_due(NOW, 5))
        assert connection_ids
        for _round in range(2):
            killed = set(connection_ids)
            for thread_id in killed:
                with contextlib.suppress(pymysql.err.OperationalError):
                    rows_where(f"KILL {int(thread_id)}")
            more = [record() for _ in range(40)]
            outcomes = await asyncio.gather(*(store.save([r]) for r in more))
            assert outcomes == [[Saved.STORED]] * 40
            assert len(await store.page_due(NOW, 1000)) == 40 + len(first)
            assert await store.get(more[0].message_id) == more[0]
            await store.delete(more)
            assert connection_ids - killed, "new connections were made"
        assert await store.backlog() == {"trade": 40}
    finally:
        await store.close()


# -- durability across a SIGKILL ----------------------------------------------------------

# The child saves from 4 concurrent tasks and prints the ids of each call once ``save``
# has returned STORED for them; it is SIGKILLed mid-stream.
_CHILD = """
import asyncio, sys, time
from kiteq.core.message import Message, StoredMessage
from kiteq.store.base import Saved
from kiteq.store.url import open_store

async def producer(store, deadline):
    while time.monotonic() < deadline:
        batch = [
            StoredMessage(message=Message(topic="t", message_type="m", body=b"x" * 1024),
                          publish_time=1.0)
            for _ in range(10)
        ]
        outcomes = await store.save(batch)
        assert outcomes == [Saved.STORED] * 10, outcomes
        print(" ".join(r.message_id for r in batch), flush=True)

async def main():
    store = open_store(sys.argv[1])
    await store.open()
    deadline = time.monotonic() + 60
    await asyncio.gather(*(producer(store, deadline) for _ in range(4)))

asyncio.run(main())
"""


async def test_acked_saves_survive_sigkill(prefix: str) -> None:
    url = url_of(prefix)
    acked = await acked_before_sigkill(_CHILD, url, lines=60)
    async with opened(mysql(url)) as store:
        missing = [mid for mid in acked if await store.get(mid) is None]
        assert missing == []
        assert (await store.backlog())["t"] >= len(acked)


def test_bad_constructor_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="shardnum"):
        open_store("mysql://127.0.0.1?shardnum=5")


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield

    def left() -> set[str]:
        running = {t.name for t in threading.enumerate() if t.name.startswith("kiteq-store")}
        return running - before

    try:
        wait_until(lambda: not left(), 5, "the store threads to end")
    except AssertionError:
        raise AssertionError(f"store threads left running: {sorted(left())}") from None
