"""The MySQL store's dead-letter writes: moves into the DLQ, and redrives out of it.

Both read the rows they move ``FOR UPDATE`` and change the message row and its
dead-letter rows in the same transaction, so a message is never lost between them (see
``_mysql_requests`` for how parts are queued and applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Self

from kiteq.store._groups import redrive_groups
from kiteq.store._mysql_requests import BookkeepingPart, Change, Kind, RecordCall, RecordPart
from kiteq.store._mysql_rows import (
    _COLUMNS,
    _DLQ_COLUMNS,
    _KITE_SERVER,
    _RESCHEDULED,
    _TOPIC,
    _Bookkeeping,
    _bookkeeping,
    _dead_letter,
    _groups,
    _record,
    _Row,
    _row,
)
from kiteq.store._mysql_schema import DLQ_COLUMNS, MESSAGE_COLUMNS
from kiteq.store._mysql_tx import DEAD_TIME_AT, GROUP_AT, MESSAGE_ID_AT, ShardTx
from kiteq.store.base import DlqKey

__all__ = ["DeadLetterPart", "Letter", "RedrivePart"]

# positions of the bookkeeping columns in a MESSAGE_COLUMNS row, in _Bookkeeping order
_BOOKKEEPING: Final = tuple(MESSAGE_COLUMNS.index(c) for c in _RESCHEDULED)
_REDRIVE_SETS: Final = ", ".join(f"`{c}` = %s" for c in (*_RESCHEDULED, "expired_time"))

# (table, message_id, the record's bookkeeping, reason, dead_time, group, keep)
Letter = tuple[int, str, _Bookkeeping, str, float, str, bool]


class RedrivePart(RecordPart):
    """Redrives of (message_id, group) keys.

    ``items[i]`` names the id and ``groups[i]`` the group; ``found`` holds a record at
    the position of its message's first key.
    """

    __slots__ = ("groups", "now")
    kind = Kind.REDRIVE

    def __init__(self, call: RecordCall, shard: int, now: float) -> None:
        super().__init__(call, shard)
        self.now = now
        self.groups: list[str] = []

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        # id -> (table, now) of its first key in this run: later keys of a message join
        # its redrive, keys repeated find no dead letter left
        first: dict[str, tuple[int, float]] = {}
        # key -> (call, position) of each call naming it
        wanted: dict[DlqKey, list[tuple[RedrivePart, int]]] = {}
        for part in parts:
            for (position, table, message_id), group in zip(part.items, part.groups, strict=True):
                first.setdefault(message_id, (table, part.now))
                wanted.setdefault((message_id, group), []).append((part, position))
        dead = [
            row
            for row in tx.locked_dead(list(first))
            if (row[MESSAGE_ID_AT], row[GROUP_AT]) in wanted
        ]
        if not dead:
            return
        tx.delete_dead(dead)
        revived, answers = _revived(dead, wanted)
        by_table: dict[int, list[str]] = {}
        for message_id in revived:
            by_table.setdefault(first[message_id][0], []).append(message_id)
        for table, ids in by_table.items():
            name = tx.tables[table]
            live = tx.locked_rows(name, _COLUMNS, ids)
            rows: list[_Row] = []
            updates: list[tuple[object, ...]] = []
            for message_id in ids:
                latest, groups = revived[message_id]
                stored = live.get(message_id)
                record = _record(stored) if stored is not None else _dead_letter(latest[1:]).record
                redrive_groups(
                    record, groups, first[message_id][1], still_stored=stored is not None
                )
                if stored is None:
                    rows.append(_row(record))
                    if record.kite_server == tx.owner:
                        tx.backlog[record.topic] += 1
                else:
                    updates.append((*_bookkeeping(record), record.message.expired_time, message_id))
                if record.message.commit:
                    for asker, position in answers[message_id].items():
                        asker.found[position] = record
            if rows:
                tx.insert_messages(name, rows)
            if updates:
                tx.conn.exec_driver_sql(
                    f"UPDATE {name} SET {_REDRIVE_SETS} WHERE message_id = %s",  # noqa: S608
                    updates,
                )


def _revived(
    dead: Sequence[_Row], wanted: dict[DlqKey, list[tuple[RedrivePart, int]]]
) -> tuple[dict[str, tuple[_Row, list[str]]], dict[str, dict[RedrivePart, int]]]:
    """Per message id: (its latest dead-letter row, the groups redriven), and the answers.

    The answers of an id: each call that redrove one of its letters, at its first such key.
    """
    revived: dict[str, tuple[_Row, list[str]]] = {}
    answers: dict[str, dict[RedrivePart, int]] = {}
    for row in dead:
        message_id = row[MESSAGE_ID_AT]
        for part, position in wanted[(message_id, row[GROUP_AT])]:
            found = answers.setdefault(message_id, {})
            found[part] = min(position, found.get(part, position))
        latest, groups = revived.get(message_id, (row, []))
        groups.append(row[GROUP_AT])
        # the latest letter has the latest state of the message's other groups
        revived[message_id] = (
            row if row[DEAD_TIME_AT] >= latest[DEAD_TIME_AT] else latest,
            groups,
        )
    return revived, answers


class DeadLetterPart(BookkeepingPart[Letter]):
    __slots__ = ()
    kind = Kind.DEAD_LETTER

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        # id -> its letters in call order; table of the id
        letters: dict[str, list[Letter]] = {}
        for part in parts:
            for item in part.items:
                letters.setdefault(item[1], []).append(item)
        by_table: dict[int, list[str]] = {}
        for message_id, mine in letters.items():
            by_table.setdefault(mine[0][0], []).append(message_id)
        for table, ids in by_table.items():
            _dead_letter_table(tx, table, ids, letters)


def _dead_letter_table(
    tx: ShardTx, table: int, ids: list[str], letters: dict[str, list[Letter]]
) -> None:
    """Move the letters of *ids* (all in message table *table*) into the DLQ."""
    name = tx.tables[table]
    live = tx.locked_rows(name, _COLUMNS, ids)
    if not live:
        return
    keys: set[DlqKey] = {
        (message_id, item[5]) for message_id in live for item in letters[message_id]
    }
    # a letter of a key already there (say, an id saved again) replaces it
    tx.delete_dead(
        [row for row in tx.locked_dead(list(live)) if (row[MESSAGE_ID_AT], row[GROUP_AT]) in keys]
    )
    rows: list[_Row] = []
    kept: list[Change] = []
    removed: list[str] = []
    for message_id, stored in live.items():
        mine = letters[message_id]
        owned = stored[_KITE_SERVER] == tx.owner
        # the last letter of a key wins
        final = {item[5]: item for item in mine}
        for _, _, bookkeeping, reason, dead_time, group, _ in final.values():
            row = list(stored)
            # The caller's bookkeeping is the latest (as in reschedule); the message and
            # its committed flag are the stored ones.
            for at, value in zip(_BOOKKEEPING, bookkeeping, strict=True):
                row[at] = value
            rows.append((*row, reason, dead_time, _groups([group] if group else ()), group))
            if owned:
                tx.dlq[(stored[_TOPIC], group)] += 1
        last = mine[-1]
        if last[6]:
            kept.append((table, message_id, *last[2]))
        else:
            removed.append(message_id)
            if owned:
                tx.backlog[stored[_TOPIC]] -= 1
    tx.insert(tx.dlq_table, _DLQ_COLUMNS, len(DLQ_COLUMNS), rows)
    if kept:
        tx.update_bookkeeping(name, kept)
    if removed:
        tx.delete_ids(name, removed)
