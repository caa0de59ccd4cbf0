"""Data as the stores wrote it before issue #10 (commit 6de450d), to test that it loads.

RocksDB: the state and dead-letter value encoders of ``store/kiteq/store/codec.py`` at
6de450d (``git show 6de450d:store/kiteq/store/codec.py``), frozen: the message value did
not change, so ``codec.encode_message`` still writes it. ``STATE_HEX`` and ``DEAD_HEX``
are what that version itself wrote for ``golden_record()`` (run from a checkout of
6de450d); ``test_legacy_data.py`` checks the frozen encoders reproduce them byte for
byte, so the databases the tests build from them are what an old broker left behind.

MySQL: the DDL that version's ``kiteq-schema`` ran (its SQLAlchemy tables compiled for
MySQL, printed from a checkout of 6de450d; ``{db}`` stands for a database) and the
columns its rows had: succ/fail groups as JSON arrays, one dead-letter row per message
naming its groups in ``dead_groups``.

Do not change this module to follow the store: it is the previous version.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from kiteq.core.message import Message

__all__ = [
    "DEAD_HEX",
    "DLQ_COLUMNS",
    "MESSAGE_COLUMNS",
    "MESSAGE_ID",
    "MYSQL_DDL",
    "STATE_HEX",
    "encode_dead_entry",
    "encode_state",
    "golden_message",
]

_STATE: Final = struct.Struct("<BBIdIII")
_DEAD: Final = struct.Struct("<BdIII")
_COMMITTED: Final = 1
_VERSION: Final = 1

NOW: Final = 1_700_000_000.0
MESSAGE_ID: Final = "0123456789abcdef0123456789abcdef"

# 6de450d's encode_state(state_of(r)) and encode_dead_entry(encode_message(r), state_of(r),
# "deliver_limit", NOW, ("g1", "g2")) for r = golden_message() with publish_time NOW - 0.5,
# deliver_count 5, succ_groups ("g0",), fail_groups ("g1", "g2"), next_deliver_time NOW + 20
STATE_HEX: Final = (
    "01010500000000000045fc54d9410500000001000000020000007472616465020000000200000002000000"
    "673067316732"
)
DEAD_HEX: Final = (
    "0100000040fc54d9410d000000020000003100000064656c697665725f6c696d6974020000000200000067"
    "31673201010500000000000045fc54d9410500000001000000020000007472616465020000000200000002"
    "000000673067316732010010ff53650000000064000000fff05365000000000000e03ffc54d94120000000"
    "050000000800000007000000000000000800000001000000303132333435363738396162636465663031"
    "323334353637383961626364656674726164657061792d7375636370732d7465737401000000010000006b"
    "766f6c6420626f6479"
)


def golden_message() -> Message:
    return Message(
        topic="trade",
        message_type="pay-succ",
        body=b"old body",
        message_id=MESSAGE_ID,
        properties={"k": "v"},
        expired_time=int(NOW) + 3600,
        deliver_limit=100,
        group_id="ps-test",
        commit=True,
        create_time=int(NOW) - 1,
    )


def encode_state(
    topic: str,
    committed: bool,
    deliver_count: int,
    succ_groups: Sequence[str],
    fail_groups: Sequence[str],
    next_deliver_time: float,
) -> bytes:
    """6de450d's ``encode_state`` (its ``State`` fields as arguments)."""
    encoded_topic = topic.encode()
    head = _STATE.pack(
        _VERSION,
        _COMMITTED if committed else 0,
        deliver_count,
        next_deliver_time,
        len(encoded_topic),
        len(succ_groups),
        len(fail_groups),
    )
    if not succ_groups and not fail_groups:
        return head + encoded_topic
    groups = [g.encode() for g in (*succ_groups, *fail_groups)]
    lengths = struct.pack(f"<{len(groups)}I", *map(len, groups))
    return b"".join((head, encoded_topic, lengths, *groups))


def encode_dead_entry(
    message: bytes, state: bytes, reason: str, dead_time: float, groups: Sequence[str]
) -> bytes:
    """6de450d's ``encode_dead_entry``, taking the state value already encoded."""
    why = reason.encode()
    head = _DEAD.pack(_VERSION, dead_time, len(why), len(groups), len(state))
    if not groups:
        return b"".join((head, why, state, message))
    names = [g.encode() for g in groups]
    lengths = struct.pack(f"<{len(names)}I", *map(len, names))
    return b"".join((head, why, lengths, *names, state, message))


# -- MySQL -----------------------------------------------------------------------------

_MESSAGE_COLUMNS_DDL: Final = """
    id BIGINT NOT NULL AUTO_INCREMENT,
    message_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    header MEDIUMBLOB NOT NULL,
    body MEDIUMBLOB NOT NULL,
    msg_type TINYINT UNSIGNED NOT NULL,
    topic VARCHAR(255) NOT NULL,
    message_type VARCHAR(255) NOT NULL,
    publish_group VARCHAR(255) NOT NULL,
    `commit` TINYINT(1) NOT NULL,
    publish_time DOUBLE NOT NULL,
    expired_time BIGINT NOT NULL,
    deliver_count INTEGER NOT NULL,
    deliver_limit INTEGER NOT NULL,
    kite_server VARCHAR(255) NOT NULL,
    fail_groups MEDIUMTEXT NOT NULL,
    succ_groups MEDIUMTEXT NOT NULL,
    next_deliver_time DOUBLE NOT NULL,"""
_TABLE_OPTIONS: Final = "ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin"
# the columns its rows had: the DDL's, in its order, less the auto-increment id
MESSAGE_COLUMNS: Final = tuple(
    line.split()[0].strip("`") for line in _MESSAGE_COLUMNS_DDL.strip().splitlines()[1:]
)
DLQ_COLUMNS: Final = (*MESSAGE_COLUMNS, "dead_reason", "dead_time", "dead_groups")


def _message_table(name: str) -> list[str]:
    return [
        f"CREATE TABLE `{{db}}`.{name} ({_MESSAGE_COLUMNS_DDL}\n    PRIMARY KEY (id)\n)"
        f"{_TABLE_OPTIONS}",
        f"CREATE INDEX idx_backlog ON `{{db}}`.{name} (kite_server, topic)",
        f"CREATE INDEX idx_recover ON `{{db}}`.{name} "
        "(kite_server, `commit`, next_deliver_time, message_id)",
        f"CREATE UNIQUE INDEX idx_message_id ON `{{db}}`.{name} (message_id)",
    ]


# for a database holding all 16 slots (shardnum=1)
MYSQL_DDL: Final = [
    *(statement for t in range(16) for statement in _message_table(f"kite_msg_{t}")),
    f"""CREATE TABLE `{{db}}`.kite_msg_dlq ({_MESSAGE_COLUMNS_DDL}
    dead_reason VARCHAR(64) NOT NULL,
    dead_time DOUBLE NOT NULL,
    dead_groups MEDIUMTEXT NOT NULL,
    PRIMARY KEY (id)
){_TABLE_OPTIONS}""",
    "CREATE INDEX idx_backlog ON `{db}`.kite_msg_dlq (kite_server, topic)",
    "CREATE INDEX idx_dlq ON `{db}`.kite_msg_dlq (kite_server, message_id)",
    "CREATE UNIQUE INDEX idx_message_id ON `{db}`.kite_msg_dlq (message_id)",
    f"""CREATE TABLE `{{db}}`.kite_msg_history (
    seq BIGINT NOT NULL AUTO_INCREMENT,
    message_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_time DOUBLE NOT NULL,
    kind VARCHAR(32) NOT NULL,
    group_name VARCHAR(255) NOT NULL,
    connection VARCHAR(255) NOT NULL,
    attempt INTEGER NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (seq)
){_TABLE_OPTIONS}""",
    "CREATE INDEX idx_history ON `{db}`.kite_msg_history (message_id, event_time, seq)",
    "CREATE INDEX idx_event_time ON `{db}`.kite_msg_history (event_time)",
    f"""CREATE TABLE `{{db}}`.kite_meta (
    meta_key VARBINARY(1024) NOT NULL,
    meta_value MEDIUMBLOB NOT NULL,
    PRIMARY KEY (meta_key)
){_TABLE_OPTIONS}""",
]
