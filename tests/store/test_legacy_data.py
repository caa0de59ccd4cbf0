"""Data written before issue #10 (per-message delivery state) loads in today's stores.

The mapping (``kiteq.store._groups.legacy_groups``): a group in ``succ_groups`` is
``ACKED``; a group in ``fail_groups`` is ``PENDING`` with the message's deliver_count as
its attempts and the message's next_deliver_time as its own; an old dead letter naming
groups (g1, g2) is one dead letter per group, each ``DEAD`` in the record, and one
naming none (``no_binding``) is the letter of group ``""``.

RocksDB databases are written with the previous version's encoders, MySQL schemas with
its DDL and rows with its columns (``tests/store/legacy_v1.py``, pinned against that
version's own bytes and printed from its tables). MySQL needs ``kiteq-schema`` (or
``autoCreate=true``) to upgrade the schema first; the tests run that too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store import _rocksdb_db, codec
from kiteq.store._mysql_engine import engine as _engine
from kiteq.store._mysql_schema import Layout, _upgrade, check_schema, create_schema
from kiteq.store.base import DeadLetter, DlqFilter, MessageStore, Rescheduled
from kiteq.store.mysql import schema_main
from kiteq.store.rocksdb import RocksDBStore
from kiteq.store.url import mysql_options, open_store
from tests._servers import unavailable
from tests.store import legacy_v1, mariadb
from tests.store.helpers import NOW, acked, dead, opened, pending, record

EVERYTHING = DlqFilter()
_FAMILIES = ("msg", "state", "due", "meta", "dlq", "history", "uncommitted")
# what an open of today's version adds (the idempotency window)
_TODAYS_FAMILIES = (*_FAMILIES, "dedup", "dedup_expiry")


def test_the_frozen_encoders_write_what_the_previous_version_wrote() -> None:
    r = StoredMessage(message=legacy_v1.golden_message(), publish_time=NOW - 0.5)
    state = legacy_v1.encode_state("trade", True, 5, ("g0",), ("g1", "g2"), NOW + 20)
    assert state.hex() == legacy_v1.STATE_HEX
    entry = legacy_v1.encode_dead_entry(
        codec.encode_message(r), state, "deliver_limit", NOW, ("g1", "g2")
    )
    assert entry.hex() == legacy_v1.DEAD_HEX


def test_a_previous_version_state_value_decodes_to_per_group_state() -> None:
    state = codec.decode_state(bytes.fromhex(legacy_v1.STATE_HEX))
    assert state.groups == {"g0": acked(0), "g1": pending(5, NOW + 20), "g2": pending(5, NOW + 20)}
    assert (state.topic, state.committed, state.deliver_count, state.only_groups) == (
        "trade",
        True,
        5,
        (),
    )


def test_a_previous_version_dead_letter_is_one_letter_per_group() -> None:
    letters = codec.decode_legacy_dead_letters(bytes.fromhex(legacy_v1.DEAD_HEX))
    groups = {"g0": acked(0), "g1": dead(5, NOW + 20), "g2": dead(5, NOW + 20)}
    expected = StoredMessage(
        message=legacy_v1.golden_message(),
        publish_time=NOW - 0.5,
        deliver_count=5,
        groups=groups,
        next_deliver_time=NOW + 20,
    )
    assert letters == [
        DeadLetter(expected, "deliver_limit", NOW, "g1"),
        DeadLetter(expected, "deliver_limit", NOW, "g2"),
    ]


def _write_old_database(path: str) -> dict[str, StoredMessage]:
    """A RocksDB database as the previous version left it; returns its records by role."""
    acked_and_failed = record(ndt=NOW + 20)
    untouched = record(ndt=NOW - 5, topic="user")
    uncommitted = record(commit=False, ndt=NOW + 6)
    dead_two = record(message_type="pay-fail")
    no_binding = record(topic="user")
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    db = Rdict(path, options, column_families={n: Options(raw_mode=True) for n in _FAMILIES})
    msg, state, due = (db.get_column_family(n) for n in ("msg", "state", "due"))
    dlq, uncommitted_cf = db.get_column_family("dlq"), db.get_column_family("uncommitted")
    live = [
        (acked_and_failed, 3, ("g0",), ("g1",)),
        (untouched, 0, (), ()),
        (uncommitted, 2, (), ()),
    ]
    for r, count, succ, fail in live:
        key = r.message_id.encode()
        msg[key] = codec.encode_message(r)
        state[key] = legacy_v1.encode_state(
            r.topic, r.message.commit, count, succ, fail, r.next_deliver_time
        )
        if r.message.commit:
            due[_rocksdb_db.due_time(r.next_deliver_time) + key] = b""
        else:
            uncommitted_cf[key] = b""
    uncommitted_cf[b"\xff"] = b""  # that version's marker: the index is complete
    old_dead = [
        (dead_two, "deliver_limit", ("g0",), ("g1", "g2"), ("g1", "g2")),
        (no_binding, "no_binding", (), (), ()),
    ]
    for r, reason, succ, fail, groups in old_dead:
        old_state = legacy_v1.encode_state(r.topic, True, 7, succ, fail, NOW + 40)
        dlq[r.message_id.encode()] = legacy_v1.encode_dead_entry(
            codec.encode_message(r), old_state, reason, NOW + 1, groups
        )
    del msg, state, due, dlq, uncommitted_cf
    db.close()
    return {
        "acked_and_failed": acked_and_failed,
        "untouched": untouched,
        "uncommitted": uncommitted,
        "dead_two": dead_two,
        "no_binding": no_binding,
    }


async def _read_acked_and_failed(
    store: MessageStore, old: dict[str, StoredMessage]
) -> tuple[StoredMessage, StoredMessage]:
    """The old record acked by g0 and failed by g1 (and one never delivered), read today."""
    r = old["acked_and_failed"]
    got = await store.get(r.message_id)
    assert got is not None
    assert got.message == r.message
    assert (got.deliver_count, got.groups, got.only_groups) == (
        3,
        {"g0": acked(0), "g1": pending(3, NOW + 20)},
        (),
    )
    untouched = await store.get(old["untouched"].message_id)
    assert untouched is not None
    assert untouched.groups == {}
    return r, got


async def _dead_two_and_todays_writes(
    store: MessageStore, two: StoredMessage, got: StoredMessage
) -> tuple[StoredMessage, StoredMessage]:
    """The old dead letters of *two* (groups g1, g2) read today; then today's writes on old
    records: a reschedule of *got* and a redrive of one group. The rescheduled and the
    redriven record."""
    letters = await store.get_dead_letters(two.message_id)
    assert [(d.group, d.reason, d.dead_time) for d in letters] == [
        ("g1", "deliver_limit", NOW + 1),
        ("g2", "deliver_limit", NOW + 1),
    ]
    for dead_letter in letters:
        assert dead_letter.record.groups == {
            "g0": acked(0),
            "g1": dead(7, NOW + 40),
            "g2": dead(7, NOW + 40),
        }
        assert dead_letter.record.message == two.message
    # a reschedule rewrites the state in today's form...
    new = got
    new.groups["g1"] = pending(4, NOW + 60)
    new.next_deliver_time = NOW + 60
    await store.reschedule([Rescheduled(new, NOW + 20)])
    # ...and a redrive of one group of an old dead letter is for that group only
    [back] = await store.redrive([(two.message_id, "g2")], NOW)
    assert back.only_groups == ("g2",)
    assert back.groups == {"g0": acked(0), "g1": dead(7, NOW + 40), "g2": pending(0, NOW)}
    return new, back


async def test_rocksdb_opens_a_database_of_the_previous_version(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    old = _write_old_database(path)
    async with opened(RocksDBStore(path)) as store:
        r, got = await _read_acked_and_failed(store, old)
        assert got.settled("g0")
        assert not got.settled("g1")
        [tx] = await store.page_uncommitted(10)
        assert (tx.message_id, tx.deliver_count) == (old["uncommitted"].message_id, 2)
        assert [d.message_id for d in await store.page_due(NOW + 20, 10)] == [
            old["untouched"].message_id,
            r.message_id,
        ]
        assert await store.backlog() == {"trade": 2, "user": 1}

        two, none = old["dead_two"], old["no_binding"]
        assert await store.dlq_size() == {("trade", "g1"): 1, ("trade", "g2"): 1, ("user", ""): 1}
        assert [d.key for d in await store.list_dlq(EVERYTHING, 10)] == sorted(
            [(two.message_id, "g1"), (two.message_id, "g2"), (none.message_id, "")]
        )
        new, back = await _dead_two_and_todays_writes(store, two, got)

    async with opened(RocksDBStore(path)) as reopened:
        assert await reopened.get(r.message_id) == new
        assert await reopened.get(two.message_id) == back
        assert await reopened.dlq_size() == {("trade", "g1"): 1, ("user", ""): 1}
    # rewritten in today's format: the rescheduled state and the migrated dead letters
    states = dict(_raw(path, "state"))
    assert states[r.message_id.encode()][0] == codec.STATE_VERSION
    assert states[old["untouched"].message_id.encode()][0] == 1  # read as it is
    assert {value[0] for _, value in _raw(path, "dlq")} == {codec.DEAD_VERSION}


def _raw(path: str, family: str) -> list[tuple[bytes, bytes]]:
    families = {n: Options(raw_mode=True) for n in _TODAYS_FAMILIES}
    db = Rdict(path, Options(raw_mode=True), column_families=families)
    try:
        column = db.get_column_family(family)
        items = [(bytes(k), bytes(v)) for k, v in column.items()]  # type: ignore[arg-type]
        del column
        return items
    finally:
        db.close()


# -- MySQL -------------------------------------------------------------------------------


@pytest.fixture
def old_mysql() -> Iterator[str]:
    """Databases (shardnum 1) with the schema the previous version's kiteq-schema made."""
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(1, schema=False) as prefix:
        database = f"{prefix}_0"
        with mariadb.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            for statement in legacy_v1.MYSQL_DDL:
                cur.execute(statement.replace("{db}", database))
        yield prefix


def _old_url(prefix: str, **params: object) -> str:
    return mariadb.url(prefix, shardnum=1, kiteServer="", flushSeconds=0, **params)


def _insert_old(
    prefix: str,
    r: StoredMessage,
    deliver_count: int,
    succ: list[str],
    fail: list[str],
    dead: tuple[str, float, list[str]] | None = None,
) -> None:
    """A row as the previous version's store wrote it (message table, or the DLQ)."""
    _, table = Layout(prefix, 1).route(r.message_id)
    m = r.message
    values: list[object] = [
        m.message_id,
        b'{"createTime":%d}' % m.create_time,
        m.body,
        0x11,
        m.topic,
        m.message_type,
        m.group_id,
        int(m.commit),
        r.publish_time,
        m.expired_time,
        deliver_count,
        m.deliver_limit,
        "",
        json.dumps(fail),
        json.dumps(succ),
        r.next_deliver_time,
    ]
    columns: tuple[str, ...] = legacy_v1.MESSAGE_COLUMNS
    name = f"kite_msg_{table}"
    if dead is not None:
        reason, dead_time, groups = dead
        values += (reason, dead_time, json.dumps(groups))
        columns = legacy_v1.DLQ_COLUMNS
        name = "kite_msg_dlq"
    listed = ", ".join(f"`{c}`" for c in columns)
    marks = ", ".join(["%s"] * len(columns))
    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO `{prefix}_0`.`{name}` ({listed}) VALUES ({marks})", values)


def _old_rows(prefix: str) -> dict[str, StoredMessage]:
    rows = {
        "acked_and_failed": record(ndt=NOW + 20),
        "untouched": record(ndt=NOW - 5, topic="user"),
        "dead_two": record(message_type="pay-fail", ndt=NOW + 40),
        "dead_one": record(ndt=NOW + 40),
        "no_binding": record(topic="user", ndt=NOW + 40),
    }
    _insert_old(prefix, rows["acked_and_failed"], 3, ["g0"], ["g1"])
    _insert_old(prefix, rows["untouched"], 0, [], [])
    dead = ("deliver_limit", NOW + 1)
    _insert_old(prefix, rows["dead_two"], 7, ["g0"], ["g1", "g2"], (*dead, ["g1", "g2"]))
    _insert_old(prefix, rows["dead_one"], 2, [], ["g3"], (*dead, ["g3"]))
    _insert_old(prefix, rows["no_binding"], 0, [], [], ("no_binding", NOW + 1, []))
    return rows


def _sql(statement: str, *args: object) -> list[tuple[object, ...]]:
    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute(statement, args)
        return list(cur.fetchall())


async def test_mysql_reports_a_previous_version_schema_and_will_not_open_on_it(
    old_mysql: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"{old_mysql}_0"
    assert schema_main(["--check", _old_url(old_mysql)]) == 1
    err = capsys.readouterr().err
    assert f"missing column {database}.kite_msg_0.group_state" in err
    assert f"missing column {database}.kite_msg_dlq.group_id" in err
    assert f"upgrade of {database}.kite_msg_dlq: drop index idx_message_id" in err
    assert f"missing index {database}.kite_msg_dlq.idx_dlq_key (message_id, group_id)" in err
    assert f"index {database}.kite_msg_dlq.idx_dlq is (kite_server, message_id)" in err

    store = open_store(_old_url(old_mysql))
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    await store.close()
    message = str(info.value)
    assert "older version" in message
    assert "create or upgrade it with kiteq-schema" in message
    assert "autoCreate=true" in message


async def test_mysql_kiteq_schema_upgrades_and_rows_of_the_previous_version_load(
    old_mysql: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _old_rows(old_mysql)
    database = f"{old_mysql}_0"
    url = _old_url(old_mysql)
    assert schema_main([url]) == 0
    out = capsys.readouterr().out
    assert f"created column {database}.kite_msg_3.group_state" in out
    assert f"upgrade of {database}.kite_msg_dlq: split 2 dead letter(s) into one per group" in out
    assert f"upgrade of {database}.kite_msg_dlq: drop index idx_message_id" in out
    assert "schema complete" in out
    assert schema_main(["--check", url]) == 0
    assert schema_main([url]) == 0  # idempotent: nothing left to do
    assert "created" not in capsys.readouterr().out

    async with opened(open_store(url)) as store:
        r, got = await _read_acked_and_failed(store, old)
        assert [d.message_id for d in await store.page_due(NOW + 20, 10)] == [
            old["untouched"].message_id,
            r.message_id,
        ]
        assert await store.backlog() == {"trade": 1, "user": 1}

        two, one, none = old["dead_two"], old["dead_one"], old["no_binding"]
        assert await store.dlq_size() == {
            ("trade", "g1"): 1,
            ("trade", "g2"): 1,
            ("trade", "g3"): 1,
            ("user", ""): 1,
        }
        keys = [(two.message_id, "g1"), (two.message_id, "g2")]
        keys += [(one.message_id, "g3"), (none.message_id, "")]
        assert [d.key for d in await store.list_dlq(DlqFilter(), 10)] == sorted(keys)
        new, back = await _dead_two_and_todays_writes(store, two, got)

    async with opened(open_store(url)) as reopened:
        assert await reopened.get(r.message_id) == new
        assert await reopened.get(two.message_id) == back
    _, table = Layout(old_mysql, 1).route(r.message_id)
    [(succ, fail, state)] = _sql(
        f"SELECT succ_groups, fail_groups, group_state FROM `{database}`.`kite_msg_{table}` "
        "WHERE message_id = %s",
        r.message_id,
    )
    # KiteQ's columns still filled, derived from the per-group state
    assert (json.loads(str(succ)), json.loads(str(fail))) == (["g0"], ["g1"])
    assert json.loads(str(state)) == {"g0": ["acked", 0, 0.0], "g1": ["pending", 4, NOW + 60]}


async def test_mysql_auto_create_upgrades_a_previous_version_schema_at_open(
    old_mysql: str,
) -> None:
    old = _old_rows(old_mysql)
    async with opened(open_store(_old_url(old_mysql, autoCreate="true"))) as store:
        assert len(await store.list_dlq(DlqFilter(), 10)) == 4
        assert await store.get(old["untouched"].message_id) == old["untouched"]
    assert schema_main(["--check", _old_url(old_mysql)]) == 0


async def test_mysql_an_interrupted_upgrade_is_finished_by_the_next_run(old_mysql: str) -> None:
    old = _old_rows(old_mysql)
    layout = Layout(old_mysql, 1)
    engine = _engine(mysql_options(_old_url(old_mysql)), 1)
    try:
        with engine.connect() as conn:
            # every step but the last, the unique (message_id, group_id) index
            _upgrade(conn, layout, layout.metadata())
            conn.commit()
            problems = check_schema(conn, layout)
            assert f"index {old_mysql}_0.kite_msg_dlq.idx_dlq_key (message_id, group_id)" in (
                problems
            )
            done = create_schema(conn, layout)
            conn.commit()
            assert f"index {old_mysql}_0.kite_msg_dlq.idx_dlq_key (message_id, group_id)" in done
            assert check_schema(conn, layout) == []
    finally:
        engine.dispose()
    # each old dead letter was split once
    assert _sql(
        f"SELECT group_id FROM `{old_mysql}_0`.kite_msg_dlq WHERE message_id = %s "
        "ORDER BY group_id",
        old["dead_two"].message_id,
    ) == [("g1",), ("g2",)]
