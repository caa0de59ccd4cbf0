"""The gRPC ``Admin`` servicer: stats, bindings and message lookup for operators."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

from kiteq.binding.match import BindingTable
from kiteq.broker import wire
from kiteq.core.config import ClusterConfig
from kiteq.core.ids import is_message_id
from kiteq.handler.connection import ConnectionTable
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.intake import Intake
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from kiteq.store.base import MessageStore

ADMIN_SECRET_HEADER = "x-kiteq-admin-secret"  # noqa: S105 - a header name


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        *,
        config: ClusterConfig,
        advertised: str,
        store: MessageStore,
        bindings: BindingTable,
        connections: ConnectionTable,
        dispatcher: Dispatcher,
        intake: Intake,
        uptime: Callable[[], float],
    ) -> None:
        self._config = config
        self._advertised = advertised
        self._store = store
        self._bindings = bindings
        self._connections = connections
        self._dispatcher = dispatcher
        self._intake = intake
        self._uptime = uptime

    async def _authorize(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        expected = self._config.admin_secret
        if not expected:
            return
        given = dict(context.invocation_metadata() or ()).get(ADMIN_SECRET_HEADER, "")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing admin secret")

    async def Stats(
        self,
        request: admin_pb2.StatsRequest,
        context: grpc.aio.ServicerContext[admin_pb2.StatsRequest, admin_pb2.StatsResponse],
    ) -> admin_pb2.StatsResponse:
        await self._authorize(context)  # type: ignore[arg-type]
        groups = [
            admin_pb2.GroupStats(
                groupId=group,
                connections=len(members),
                inFlight=sum(len(c.inflight) for c in members),
            )
            for group, members in sorted(self._connections.groups().items())
        ]
        return admin_pb2.StatsResponse(
            broker=self._advertised,
            cluster=self._config.name,
            store=self._store.description,
            storeDurable=self._store.durable,
            received=self._intake.received,
            rejected=self._intake.rejected,
            delivered=self._dispatcher.delivered,
            redelivered=self._dispatcher.redelivered,
            backlog=await self._store.backlog(),
            groups=groups,
            uptimeSeconds=self._uptime(),
            topics=list(self._config.topics),
        )

    async def ListBindings(
        self,
        request: admin_pb2.ListBindingsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListBindingsRequest, admin_pb2.ListBindingsResponse
        ],
    ) -> admin_pb2.ListBindingsResponse:
        await self._authorize(context)  # type: ignore[arg-type]
        found = self._bindings.bindings(request.topic or None)
        return admin_pb2.ListBindingsResponse(bindings=[wire.binding_to_pb(b) for b in found])

    async def GetMessage(
        self,
        request: admin_pb2.GetMessageRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.GetMessageRequest, admin_pb2.GetMessageResponse
        ],
    ) -> admin_pb2.GetMessageResponse:
        await self._authorize(context)  # type: ignore[arg-type]
        if not is_message_id(request.messageId):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "message id must be 32 hex characters"
            )
        record = await self._store.get(request.messageId)
        if record is None:
            return admin_pb2.GetMessageResponse(found=False)
        return wire.message_info(record, request.withBody)
