"""The gRPC ``Admin`` servicer: stats, bindings and message lookup for operators.

DLQ, transaction and message operations are ``kiteq.broker.operator``'s (shared with the
console on the ops port); this module authenticates, translates and audit-logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

from kiteq.binding.base import BindingRegistry
from kiteq.broker import wire
from kiteq.broker.operator import MAX_PAGE, CancelOutcome, Operator
from kiteq.core.admin import ADMIN_SECRET_HEADER, DEAD_LETTER_REASONS, audit, secret_matches
from kiteq.core.errors import PermissionDeniedError
from kiteq.core.ids import canonical_message_id, is_message_id
from kiteq.core.limits import is_name
from kiteq.core.message import TxStatus
from kiteq.core.webhook import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_SECONDS, WebhookEndpoint
from kiteq.handler.core import BrokerCore
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_PAGE = 100

# every call's context; the request and response types are the method's own
_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        *,
        core: BrokerCore,
        advertised: str,
        uptime: Callable[[], float],
        registry: BindingRegistry | None = None,
    ) -> None:
        self._core = core
        self._config = core.config
        self._advertised = advertised
        self._uptime = uptime
        self._operator = Operator(core)
        self._registry = registry

    async def _authorize(self, context: _Context) -> None:
        expected = self._config.admin_secret
        if not expected:
            return
        given = dict(context.invocation_metadata() or ()).get(ADMIN_SECRET_HEADER, "")
        if not given or not secret_matches(given, expected):
            audit.warning(
                "admin auth failed peer=%s reason=%s",
                context.peer(),
                "wrong secret" if given else "no secret",
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing admin secret")

    async def Stats(
        self, request: admin_pb2.StatsRequest, context: _Context
    ) -> admin_pb2.StatsResponse:
        await self._authorize(context)
        core = self._core
        tally = core.dispatcher.tally
        groups = [
            admin_pb2.GroupStats(
                groupId=group,
                connections=len(members),
                inFlight=sum(len(c.inflight) for c in members),
            )
            for group, members in sorted(core.connections.groups().items())
        ]
        dead = await core.store.dlq_size()
        dead_per_topic: dict[str, int] = {}
        for (topic, _), n in dead.items():
            dead_per_topic[topic] = dead_per_topic.get(topic, 0) + n
        return admin_pb2.StatsResponse(
            broker=self._advertised,
            cluster=self._config.name,
            store=core.store.description,
            storeDurable=core.store.durable,
            received=core.intake.received,
            rejected=core.intake.rejected,
            delivered=tally.delivered,
            redelivered=tally.redelivered,
            backlog=await core.store.backlog(),
            groups=groups,
            uptimeSeconds=self._uptime(),
            topics=list(self._config.topics),
            deadLetters=dead_per_topic,
            deadLettered=tally.dead_lettered,
            flowLimited=tally.flow_limited,
            pendingTransactions=core.transactions.pending,
            unresolvedTransactions=core.transactions.unresolved,
            recoverScans=core.recover.scans,
            txChecksSent=core.transactions.checks_sent,
            deadLetterGroups=[
                admin_pb2.DeadLetterCount(topic=topic, groupId=group, count=n)
                for (topic, group), n in sorted(dead.items())
            ],
            groupBacklogs=self._group_backlogs(),
        )

    def _group_backlogs(self) -> list[admin_pb2.GroupBacklog]:
        """Every bound (topic, group) and every pair with messages, from memory."""
        gauges = self._core.dispatcher.group_gauges()
        keys = {(b.topic, b.group_id) for b in self._core.bindings.bindings()}
        keys |= gauges.backlog.keys() | gauges.unacked.keys() | gauges.waiting.keys()
        return [
            admin_pb2.GroupBacklog(
                topic=topic,
                groupId=group,
                backlog=gauges.backlog.get((topic, group), 0),
                unacked=gauges.unacked.get((topic, group), 0),
                waiting=gauges.waiting.get((topic, group), 0),
                oldestAgeSeconds=gauges.oldest.get((topic, group), 0.0),
            )
            for topic, group in sorted(keys)
        ]

    async def ListBindings(
        self, request: admin_pb2.ListBindingsRequest, context: _Context
    ) -> admin_pb2.ListBindingsResponse:
        await self._authorize(context)
        found = self._core.bindings.bindings(request.topic or None)
        webhooks = {
            b.group_id: admin_pb2.Webhook(
                url=b.webhook.url,
                concurrency=b.webhook.concurrency,
                timeoutSeconds=b.webhook.timeout_seconds,
            )
            for b in found
            if b.webhook is not None
        }
        return admin_pb2.ListBindingsResponse(
            bindings=[wire.binding_to_pb(b) for b in found], webhooks=webhooks
        )

    async def BindWebhook(
        self, request: admin_pb2.BindWebhookRequest, context: _Context
    ) -> admin_pb2.BindWebhookResponse:
        await self._authorize(context)
        group = request.groupId
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not is_name(group):
            await context.abort(invalid, f"invalid group id {group[:64]!r}")
        if not request.bindings:
            await context.abort(invalid, "no bindings: a webhook group needs at least one")
        endpoint = WebhookEndpoint(
            url=request.webhook.url,
            concurrency=request.webhook.concurrency or DEFAULT_CONCURRENCY,
            timeout_seconds=request.webhook.timeoutSeconds or DEFAULT_TIMEOUT_SECONDS,
        )
        try:
            bindings = [
                dataclasses.replace(wire.binding_from_pb(b), group_id=group, webhook=endpoint)
                for b in request.bindings
            ]
            for binding in bindings:
                binding.check()
        except ValueError as exc:
            await context.abort(invalid, str(exc))
        for binding in bindings:
            if not self._config.serves(binding.topic):
                await context.abort(invalid, f"topic {binding.topic!r} is not served")
        registry = self._registry
        if registry is None or registry.kind == "file":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the registry file is authoritative: declare the webhook there",
            )
        try:
            await registry.declare(group, bindings)
        except ValueError as exc:  # outside webhookAllow, no secret to sign with, limits
            audit.warning("admin webhook refused peer=%s group=%s: %s", context.peer(), group, exc)
            await context.abort(invalid, str(exc))
        except PermissionDeniedError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.reason)
        audit.info(
            "admin webhook peer=%s group=%s url=%s bindings=%d",
            context.peer(),
            group,
            endpoint.url,
            len(bindings),
        )
        return admin_pb2.BindWebhookResponse(bindings=len(bindings))

    async def GetMessage(
        self, request: admin_pb2.GetMessageRequest, context: _Context
    ) -> admin_pb2.GetMessageResponse:
        await self._authorize(context)
        message_id = await _message_id(request.messageId, context)
        found = await self._operator.lookup(message_id)
        history = [wire.history_to_pb(e) for e in found.history]
        letters = found.letters
        if found.record is not None:
            # live, else the latest dead letter's copy
            reply = wire.message_info(found.record, request.withBody)
            reply.state = (
                admin_pb2.MESSAGE_STATE_LIVE if found.live else admin_pb2.MESSAGE_STATE_DEAD_LETTER
            )
        elif history:
            reply = admin_pb2.GetMessageResponse(found=False, state=admin_pb2.MESSAGE_STATE_GONE)
        else:
            return admin_pb2.GetMessageResponse(found=False)
        if letters:
            reply.deadReason = letters[0].reason
            reply.deadTime = letters[0].dead_time
            reply.deadLetters.extend(wire.dead_letter_to_pb(letter) for letter in letters)
        reply.history.extend(history)
        return reply

    async def ListDeadLetters(
        self, request: admin_pb2.ListDeadLettersRequest, context: _Context
    ) -> admin_pb2.ListDeadLettersResponse:
        await self._authorize(context)
        await _check_reason(request.filter, context)
        limit = _page_size(request.limit)
        after = (request.after, request.afterGroup) if request.after else None
        letters = await self._operator.dead_letters(wire.dlq_filter(request.filter), limit, after)
        more = len(letters) == limit
        return admin_pb2.ListDeadLettersResponse(
            deadLetters=[wire.dead_letter_to_pb(letter) for letter in letters],
            next=letters[-1].record.message_id if more else "",
            nextGroup=letters[-1].group if more else "",
        )

    async def Redrive(
        self, request: admin_pb2.RedriveRequest, context: _Context
    ) -> admin_pb2.RedriveResponse:
        await self._authorize(context)
        ids = [canonical_message_id(m) for m in request.messageIds]
        for message_id in ids:
            if not is_message_id(message_id):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"invalid message id {message_id!r}"
                )
        if ids:
            # by id: every group's letter of each id, or only the named group's
            keys = await self._operator.letters_of(ids, request.groupId)
            if request.dryRun:
                return admin_pb2.RedriveResponse(redriven=len(keys), dryRun=True)
            redriven = await self._operator.redrive(keys)
            audit.info(
                "admin redrive peer=%s ids=%d group=%s redriven=%d",
                context.peer(),
                len(ids),
                request.groupId or "*",
                redriven,
            )
            return admin_pb2.RedriveResponse(redriven=redriven)
        await _check_reason(request.filter, context)
        where = wire.dlq_filter(request.filter)
        if request.dryRun:
            count = await self._operator.count(where)
            return admin_pb2.RedriveResponse(redriven=count, dryRun=True)
        redriven = await self._operator.redrive_where(where)
        audit.info(
            "admin redrive peer=%s filter=topic:%s,type:%s,group:%s,reason:%s redriven=%d",
            context.peer(),
            request.filter.topic or "*",
            request.filter.messageType or "*",
            request.filter.groupId or "*",
            request.filter.reason or "*",
            redriven,
        )
        return admin_pb2.RedriveResponse(redriven=redriven)

    async def ListTransactions(
        self, request: admin_pb2.ListTransactionsRequest, context: _Context
    ) -> admin_pb2.ListTransactionsResponse:
        await self._authorize(context)
        limit = _page_size(request.limit)
        pending = await self._operator.transactions(
            limit, request.after or None, unresolved_only=request.unresolvedOnly
        )
        found = [wire.transaction_info(record, unresolved) for record, unresolved in pending]
        last = found[-1].header.messageId if len(found) == limit else ""
        return admin_pb2.ListTransactionsResponse(transactions=found, next=last)

    async def ResolveTransaction(
        self, request: admin_pb2.ResolveTransactionRequest, context: _Context
    ) -> admin_pb2.ResolveTransactionResponse:
        await self._authorize(context)
        message_id = await _message_id(request.messageId, context)
        status = TxStatus.COMMIT if request.commit else TxStatus.ROLLBACK
        changed = await self._operator.resolve(message_id, status)
        audit.info(
            "admin %s peer=%s id=%s changed=%s",
            "commit" if request.commit else "rollback",
            context.peer(),
            message_id,
            changed,
        )
        return admin_pb2.ResolveTransactionResponse(changed=changed)

    async def ListScheduled(
        self, request: admin_pb2.ListScheduledRequest, context: _Context
    ) -> admin_pb2.ListScheduledResponse:
        await self._authorize(context)
        limit = _page_size(request.limit)
        after = (request.afterTime, request.after) if request.afterTime else None
        records, cursor = await self._operator.scheduled(limit, after, request.topic)
        return admin_pb2.ListScheduledResponse(
            messages=[
                admin_pb2.ScheduledInfo(
                    header=wire.header_to_pb(r.message), publishTime=r.publish_time
                )
                for r in records
            ],
            nextTime=cursor[0] if cursor is not None else 0.0,
            next=cursor[1] if cursor is not None else "",
        )

    async def CancelScheduled(
        self, request: admin_pb2.CancelScheduledRequest, context: _Context
    ) -> admin_pb2.CancelScheduledResponse:
        await self._authorize(context)
        message_id = await _message_id(request.messageId, context)
        outcome, detail = await self._operator.cancel(message_id)
        audit.info(
            "admin cancel peer=%s id=%s outcome=%s", context.peer(), message_id, outcome.value
        )
        return admin_pb2.CancelScheduledResponse(outcome=_CANCEL_OUTCOMES[outcome], detail=detail)


_CANCEL_OUTCOMES = {
    CancelOutcome.CANCELLED: admin_pb2.CANCEL_OUTCOME_CANCELLED,
    CancelOutcome.NOT_FOUND: admin_pb2.CANCEL_OUTCOME_NOT_FOUND,
    CancelOutcome.NOT_SCHEDULED: admin_pb2.CANCEL_OUTCOME_NOT_SCHEDULED,
}


def _page_size(requested: int) -> int:
    """A listing's page: *requested* (0: ``DEFAULT_PAGE``), at most the operator's ``MAX_PAGE``."""
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


async def _check_reason(where: admin_pb2.DeadLetterFilter, context: _Context) -> None:
    """Refuse a reason no dead letter can have: it would match nothing, silently."""
    if where.reason and where.reason not in DEAD_LETTER_REASONS:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown dead-letter reason {where.reason!r}; known: {', '.join(DEAD_LETTER_REASONS)}",
        )


async def _message_id(raw: str, context: _Context) -> str:
    """*raw* in its canonical spelling; a call naming no valid id ends INVALID_ARGUMENT."""
    message_id = canonical_message_id(raw)
    if not is_message_id(message_id):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "message id must be 32 hex characters"
        )
    return message_id
