"""Webhook groups: a consumer connection whose client is an HTTP endpoint the broker calls.

A group whose bindings name a webhook (``Binding.webhook``) gets one ``WebhookSink``: a
``Connection`` like a gRPC session's, in the same ``ConnectionTable``, whose credit is the
endpoint's ``concurrency``. The dispatcher pushes to it as to any consumer (watermark,
``maxDeliverWorkers``, ledger and ``deliverySeconds``); the sink POSTs each delivery
through a ``WebhookCaller`` (``kiteq.broker.webhook_http``: aiohttp) and answers the
dispatcher with ``acked`` as a session's Acks frame would: a 2xx is an ack, anything else,
no answer or a timeout a nack. Retries, backoff windows, ``deliverLimit``, dead letters
and history are therefore the dispatcher's and settlement's, unchanged.

``WebhookSinks`` follows the binding table: a group that gets a webhook gets a sink, one
whose webhook changes gets a new one (its unanswered calls are retried by the new one),
one that loses it loses its sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

from kiteq.core.clock import Clock
from kiteq.core.errors import KiteQError
from kiteq.core.message import StoredMessage
from kiteq.core.webhook import WebhookEndpoint, request_headers, signing_key
from kiteq.handler.connection import Connection, ConnectionTable
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.history import History

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.ops.metrics import BrokerMetrics

__all__ = [
    "WebhookAnswer",
    "WebhookCallError",
    "WebhookCaller",
    "WebhookSink",
    "WebhookSinks",
    "outcome_of",
]

logger = logging.getLogger(__name__)

_DETAIL_CHARS = 200


class WebhookCallError(KiteQError):
    """A webhook call got no HTTP answer: refused, reset, unresolvable, or timed out."""

    retriable: ClassVar[bool] = True

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookAnswer:
    """The endpoint's answer: its status, and a ``Retry-After`` in seconds (0: none)."""

    status: int
    retry_after: float = 0.0


class WebhookCaller(Protocol):
    """POSTs webhook requests (one pooled HTTP client for the broker)."""

    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> WebhookAnswer:
        """POST *body* to *url*; redirects are not followed (a 3xx is the answer).

        Raises:
            WebhookCallError: No answer within *timeout* seconds, or none at all.
        """
        ...

    async def close(self) -> None:
        """Close the pooled connections; idempotent."""
        ...


def outcome_of(status: int) -> str:
    """The metrics outcome of an HTTP status: its class (``2xx``...), else ``error``."""
    if 200 <= status < 600:
        return f"{status // 100}xx"
    return "error"


@dataclasses.dataclass(frozen=True, slots=True)
class _Station:
    """What every sink of a broker talks to."""

    connections: ConnectionTable
    dispatcher: Dispatcher
    history: History
    clock: Clock
    caller: WebhookCaller
    delivery_timeout: float
    metrics: BrokerMetrics | None


class WebhookSink:
    """The consumer connection of one webhook group, and its calls in flight."""

    def __init__(
        self, station: _Station, group: str, endpoint: WebhookEndpoint, key: bytes
    ) -> None:
        self._station = station
        self.group = group
        self.endpoint = endpoint
        self._key = key
        # a call is answered before the dispatcher's own deadline for the push
        self._timeout = min(endpoint.timeout_seconds, station.delivery_timeout)
        self.conn = Connection(
            group=group,
            client_id="webhook",
            peer=endpoint.url,
            max_in_flight=endpoint.concurrency,
            warmup_seconds=0,
            opened_at=station.clock.monotonic(),
        )
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        """Join the group's consumers and start calling."""
        station = self._station
        station.connections.add(self.conn)
        self._task = asyncio.create_task(self._run(), name=f"kiteq-webhook:{self.group}")
        self._task.add_done_callback(self._crashed)
        station.dispatcher.connection_opened(self.conn)
        logger.info(
            "webhook sink opened conn=%d group=%s url=%s concurrency=%d",
            self.conn.id,
            self.group,
            self.endpoint.url,
            self.endpoint.concurrency,
        )

    def close(self) -> None:
        """Leave the group: unanswered calls fail over (``disconnected``) and are cancelled."""
        if self.conn.closed:
            return
        self._station.dispatcher.connection_closed(self.conn)
        for task in (self._task, *self._calls):
            if task is not None:
                task.cancel()
        logger.info("webhook sink closed conn=%d group=%s", self.conn.id, self.group)

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._task, *self._calls) if t is not None]
        if tasks:
            await asyncio.wait(tasks)

    @property
    def calls(self) -> int:
        return len(self._calls)

    async def _run(self) -> None:
        conn = self.conn
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            _, deliveries = conn.drain()
            for record, attempt in deliveries:
                call = asyncio.create_task(self._call(record, attempt))
                self._calls.add(call)
                call.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # a bug here: the push stays in the ledger and times out into a retry
            logger.error("webhook call failed group=%s", self.group, exc_info=task.exception())

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("webhook sink crashed group=%s", self.group, exc_info=task.exception())
            self.close()

    async def _call(self, record: StoredMessage, attempt: int) -> None:
        station = self._station
        message = record.message
        message_id = record.message_id
        headers = request_headers(
            key=self._key,
            timestamp=int(station.clock.now()),
            message_id=message_id,
            attempt=attempt,
            topic=message.topic,
            message_type=message.message_type,
            group=self.group,
            properties=message.properties,
            body=message.body,
        )
        started = station.clock.monotonic()
        delay = 0.0
        try:
            answer = await station.caller.post(
                self.endpoint.url, headers, message.body, self._timeout
            )
        except WebhookCallError as exc:
            outcome = "timeout" if exc.timed_out else "error"
            ok = False
            detail = exc.reason
        else:
            outcome = outcome_of(answer.status)
            ok = outcome == "2xx"
            detail = f"HTTP {answer.status}"
            delay = 0.0 if ok else answer.retry_after
        if station.metrics is not None:
            station.metrics.webhook_called(
                message.topic, self.group, outcome, station.clock.monotonic() - started
            )
        conn = self.conn
        if not ok:
            station.history.record(
                message_id,
                station.clock.now(),
                "webhook_failed",
                group=self.group,
                connection=conn.name,
                attempt=attempt,
                detail=detail[:_DETAIL_CHARS],
            )
        if conn.closed:
            return  # the sink left its group: the push was failed over already
        delays = {message_id: delay} if delay > 0 else None
        if station.dispatcher.acked(conn, [(message_id, ok)], delays):
            # the dispatcher's deadline passed first: it retried the push already
            logger.debug("late webhook answer group=%s id=%s", self.group, message_id)


class WebhookSinks:
    """One ``WebhookSink`` per group whose bindings name a webhook, kept in step with them.

    Args:
        secrets: The cluster's group secrets (the signing keys); a binding table built with
            the same policy refuses webhooks of groups that have none.
    """

    def __init__(
        self,
        *,
        bindings: BindingTable,
        connections: ConnectionTable,
        dispatcher: Dispatcher,
        history: History,
        clock: Clock,
        caller: WebhookCaller,
        secrets: Mapping[str, str],
        delivery_timeout: float,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._bindings = bindings
        self._secrets = secrets
        self._station = _Station(
            connections=connections,
            dispatcher=dispatcher,
            history=history,
            clock=clock,
            caller=caller,
            delivery_timeout=delivery_timeout,
            metrics=metrics,
        )
        self._sinks: dict[str, WebhookSink] = {}

    def __getitem__(self, group: str) -> WebhookSink:
        return self._sinks[group]

    def groups(self) -> list[str]:
        return sorted(self._sinks)

    def start(self) -> None:
        """Open the sinks of the table's webhook groups and follow its changes."""
        self._bindings.add_listener(self._changed)
        for group in sorted({b.group_id for b in self._bindings.bindings() if b.webhook}):
            self.sync(group)

    def _changed(self, _topic: str, group: str) -> None:
        self.sync(group)

    def sync(self, group: str) -> None:
        """Open, replace or close *group*'s sink as its bindings now say."""
        endpoint = self._endpoint_of(group)
        current = self._sinks.get(group)
        if current is not None and current.endpoint == endpoint:
            return
        key = None if endpoint is None else self._key(group)
        if endpoint is None or key is None:
            self._sinks.pop(group, None)
        else:
            # the new sink first: what the old one had unanswered fails over to it at once
            sink = self._sinks[group] = WebhookSink(self._station, group, endpoint, key)
            sink.open()
        if current is not None:
            current.close()

    def _key(self, group: str) -> bytes | None:
        try:
            return signing_key(group, self._secrets)
        except ValueError as exc:
            # the table's policy refuses such bindings; one installed without it is skipped
            logger.error("webhook of group %s not started: %s", group, exc)  # noqa: TRY400
            return None

    def _endpoint_of(self, group: str) -> WebhookEndpoint | None:
        """The webhook *group*'s bindings name: that of its first topic if they disagree."""
        found = sorted(
            (
                (b.topic, b.webhook)
                for b in self._bindings.bindings()
                if b.group_id == group and b.webhook is not None
            ),
            key=lambda item: item[0],
        )
        if not found:
            return None
        if len({endpoint for _, endpoint in found}) > 1:
            logger.warning(
                "group %s names different webhooks for different topics; calling the one of "
                "topic %s",
                group,
                found[0][0],
            )
        return found[0][1]

    async def stop(self) -> None:
        """Close every sink (unanswered calls are cancelled and fail over) and the caller."""
        self._bindings.remove_listener(self._changed)
        sinks = list(self._sinks.values())
        self._sinks.clear()
        for sink in sinks:
            sink.close()
        for sink in sinks:
            await sink.wait_closed()
        await self._station.caller.close()
