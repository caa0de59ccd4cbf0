"""Webhook sinks on the broker's own pipeline (no network): credit, failover, replacement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kiteq.binding.model import Binding, BindType
from kiteq.core.webhook import AllowList, WebhookEndpoint, WebhookPolicy, verify_signature
from kiteq.handler.webhook import WebhookAnswer, WebhookCallError, WebhookSinks
from tests.handler.harness import NOW, Broker
from tests.waiting import eventually

SECRETS = {"hook": "s3cret"}
POLICY = WebhookPolicy(AllowList.parse(["http://127.0.0.1:*/"]), SECRETS)
A = WebhookEndpoint("http://127.0.0.1:1/a", concurrency=2)
B = WebhookEndpoint("http://127.0.0.1:1/b", concurrency=2)


class FakeCaller:
    """Records calls; each waits for the test to answer it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], asyncio.Future[WebhookAnswer]]] = []
        self.closed = False

    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> WebhookAnswer:
        answer: asyncio.Future[WebhookAnswer] = asyncio.get_running_loop().create_future()
        self.calls.append((url, dict(headers), answer))
        return await answer

    async def close(self) -> None:
        self.closed = True

    def pending(self) -> list[asyncio.Future[WebhookAnswer]]:
        return [answer for _, _, answer in self.calls if not answer.done()]


def sinks(broker: Broker, caller: FakeCaller) -> WebhookSinks:
    result = WebhookSinks(
        bindings=broker.table,
        connections=broker.connections,
        dispatcher=broker.dispatcher,
        history=broker.history,
        clock=broker.clock,
        caller=caller,
        secrets=SECRETS,
        delivery_timeout=5.0,
    )
    result.start()
    return result


def bind(broker: Broker, endpoint: WebhookEndpoint) -> None:
    broker.table.replace(
        "trade", "hook", [Binding("trade", "pay-succ", BindType.DIRECT, "hook", webhook=endpoint)]
    )


async def test_concurrency_is_the_sinks_credit_and_a_2xx_acks() -> None:
    caller = FakeCaller()
    async with Broker(webhooks=POLICY) as broker:
        hooks = sinks(broker, caller)
        bind(broker, A)
        sent = [await broker.publish() for _ in range(5)]
        await eventually(lambda: len(caller.calls) == 2)
        # the credit is used up: the other three wait in the dispatcher, not in calls
        assert hooks["hook"].conn.credit == 0
        assert broker.dispatcher.waiting("hook") == 3
        while len(caller.calls) < 5 or caller.pending():
            await eventually(lambda: caller.pending())
            caller.pending()[0].set_result(WebhookAnswer(204))
            await asyncio.sleep(0)
        await broker.settle()
        for message in sent:
            assert (await broker.store.get(message.message_id)) is None  # acked, deleted
        url, headers, _ = caller.calls[0]
        assert url == A.url
        message_id = headers["X-KiteQ-Message-Id"]
        assert verify_signature(b"s3cret", headers["X-KiteQ-Signature"], message_id, b"x", now=NOW)
        await hooks.stop()
    assert caller.closed


async def test_a_failed_call_is_retried_and_a_new_webhook_takes_over() -> None:
    caller = FakeCaller()
    async with Broker(webhooks=POLICY) as broker:
        hooks = sinks(broker, caller)
        bind(broker, A)
        message = await broker.publish()
        await eventually(lambda: len(caller.calls) == 1)
        caller.calls[0][2].set_result(WebhookAnswer(500))  # a nack: retried at once
        await eventually(lambda: len(caller.calls) == 2)
        assert caller.calls[1][1]["X-KiteQ-Attempt"] == "2"
        old = hooks["hook"].conn
        bind(broker, B)  # the unanswered call fails over to the new sink
        await eventually(lambda: len(caller.calls) == 3)
        assert old.closed
        assert old not in broker.connections.consumers("hook")
        url, headers, answer = caller.calls[2]
        assert (url, headers["X-KiteQ-Attempt"]) == (B.url, "3")
        answer.set_exception(WebhookCallError("refused"))  # third attempt: the backoff
        await broker.settle()
        events = [
            *await broker.store.get_history(message.message_id),
            *broker.history.unflushed(message.message_id),
        ]
        kinds = [e.kind for e in events]
        assert kinds.count("webhook_failed") == 2
        broker.table.replace("trade", "hook", ())  # no webhook any more: no sink
        assert hooks.groups() == []
        assert broker.connections.consumers("hook") == []
        await hooks.stop()
