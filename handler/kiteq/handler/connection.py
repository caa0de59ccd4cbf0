"""Broker-side state of client sessions, independent of the transport.

A ``Connection`` is one client stream: who it is (group, client id), its credit, its
ledger of pushes awaiting acks, and its outbox. The dispatcher puts deliveries on it and
the intake puts store-acks on it; the transport (``kiteq.broker.service``) drains them in
batches, so everything queued during one loop tick leaves in one frame.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import Iterator

from kiteq.core.codes import AckCode, Disposition
from kiteq.core.message import StoredMessage
from kiteq.handler.ledger import Ledger

__all__ = ["Connection", "ConnectionTable", "StoreAck"]

_ids = itertools.count(1)
# A warming connection still gets this share, so a group of only warming connections
# keeps receiving (KiteQ can skip every one of them and drop the message).
_MIN_WARM_SHARE = 0.01


@dataclasses.dataclass(slots=True)
class StoreAck:
    """The broker's answer to one published message: stored (OK) or refused, and why."""

    message_id: str
    code: AckCode
    feedback: str = ""
    disposition: Disposition = Disposition.UNSPECIFIED

    @property
    def ok(self) -> bool:
        return self.code is AckCode.OK


class Connection:
    """One client session: its identity, credits, in-flight deliveries and outbox."""

    __slots__ = (
        "_acks",
        "_checks",
        "_deliveries",
        "client_id",
        "closed",
        "group",
        "id",
        "inflight",
        "max_in_flight",
        "name",
        "opened_at",
        "paused",
        "peer",
        "wake",
        "warmup_seconds",
    )

    def __init__(
        self,
        *,
        group: str,
        client_id: str,
        peer: str,
        max_in_flight: int,
        warmup_seconds: float,
        opened_at: float,
    ) -> None:
        self.id = next(_ids)
        self.group = group
        self.client_id = client_id
        self.peer = peer
        self.max_in_flight = max_in_flight
        self.warmup_seconds = warmup_seconds
        self.opened_at = opened_at
        # how history and logs name this connection: one string, shared by every event
        # it is named in (a property made a new one per event, ~60 B each in History)
        self.name = f"{self.id}:{client_id or peer}"
        self.inflight = Ledger()
        self.closed = False
        # the client paused its deliveries (a Flow frame): no credit until it resumes
        self.paused = False
        self.wake = asyncio.Event()
        self._deliveries: list[tuple[StoredMessage, int]] = []
        self._acks: list[StoreAck] = []
        self._checks: list[tuple[StoredMessage, int]] = []

    def __repr__(self) -> str:
        return f"<Connection {self.id} group={self.group} peer={self.peer}>"

    @property
    def consumer(self) -> bool:
        return self.max_in_flight > 0

    @property
    def credit(self) -> int:
        if self.paused:
            return 0
        return self.max_in_flight - len(self.inflight)

    def share(self, now: float) -> float:
        """Fraction of its group's traffic this connection should get (warm-up ramp)."""
        if self.warmup_seconds <= 0:
            return 1.0
        return min(1.0, max(_MIN_WARM_SHARE, (now - self.opened_at) / self.warmup_seconds))

    def send_delivery(self, record: StoredMessage, attempt: int) -> None:
        self._deliveries.append((record, attempt))
        self.wake.set()

    def send_acks(self, outcomes: list[StoreAck]) -> None:
        self._acks.extend(outcomes)
        self.wake.set()

    def send_check(self, record: StoredMessage, check: int) -> None:
        """Ask this (producer) connection to decide an uncommitted message."""
        self._checks.append((record, check))
        self.wake.set()

    def drain(self) -> tuple[list[StoreAck], list[tuple[StoredMessage, int]]]:
        """Take the store-acks and deliveries queued for the client."""
        acks, deliveries = self._acks, self._deliveries
        self._acks, self._deliveries = [], []
        return acks, deliveries

    def drain_checks(self) -> list[tuple[StoredMessage, int]]:
        """Take the transaction checks queued for the client."""
        checks, self._checks = self._checks, []
        return checks


class ConnectionTable:
    """Live connections by group; picks one consumer connection per delivery."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._all: dict[int, Connection] = {}
        self._consumers: dict[str, list[Connection]] = {}
        self._groups: dict[str, list[Connection]] = {}
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._all.values()))

    def add(self, conn: Connection) -> None:
        self._all[conn.id] = conn
        self._groups.setdefault(conn.group, []).append(conn)
        if conn.consumer:
            self._consumers.setdefault(conn.group, []).append(conn)

    def remove(self, conn: Connection) -> None:
        conn.closed = True
        if self._all.pop(conn.id, None) is None:
            return
        for index in (self._groups, self._consumers):
            members = index.get(conn.group)
            if members and conn in members:
                members.remove(conn)
                if not members:
                    del index[conn.group]

    def get(self, conn_id: int) -> Connection | None:
        return self._all.get(conn_id)

    def any_of(self, group: str) -> Connection | None:
        """A random open connection of *group*, a producer one when there is one.

        (Transaction checks go here: a connection that only consumes answers none.)
        """
        members = self._groups.get(group)
        if not members:
            return None
        producers = [c for c in members if not c.consumer]
        return self._rng.choice(producers or members)

    def has_consumers(self, group: str) -> bool:
        return group in self._consumers

    def consumers(self, group: str | None = None) -> list[Connection]:
        if group is not None:
            return list(self._consumers.get(group, ()))
        return [c for members in self._consumers.values() for c in members]

    def groups(self) -> dict[str, list[Connection]]:
        return {g: list(m) for g, m in self._consumers.items()}

    def pick(self, group: str, now: float, exclude: Connection | None = None) -> Connection | None:
        """One random live connection of *group* with credit, weighted by warm-up share.

        *exclude* (the connection that just failed) is chosen only when it is the only one.
        """
        members = self._consumers.get(group)
        if not members:
            return None
        if len(members) == 1:
            only = members[0]
            return only if only.credit > 0 else None
        candidates = [c for c in members if c.credit > 0 and c is not exclude]
        if not candidates:
            return (
                exclude
                if exclude is not None and exclude.credit > 0 and not exclude.closed
                else None
            )
        if len(candidates) == 1:
            return candidates[0]
        weights = [c.share(now) for c in candidates]
        if all(w >= 1.0 for w in weights):
            return self._rng.choice(candidates)
        return self._rng.choices(candidates, weights)[0]
