"""The HTTP publish API (``-hport``), served by aiohttp.

=================================================  =========================================
``POST /v1/topics/{topic}/messages``               one message (raw body or JSON object)
``POST /v1/topics/{topic}/messages:batch``         a JSON array of up to 1,000 messages
``POST /v1/topics/{topic}/messages/{id}:commit``   commit an uncommitted message
``POST /v1/topics/{topic}/messages/{id}:rollback`` roll it back
=================================================  =========================================

A request is a client of one group, named by its credentials (``kiteq.broker.http_request``)
and checked as a gRPC session's open is (``check_credentials``). Its messages go through
the same ``Intake.publish`` as a session's publish frame, for that group only: the same
validation, ``acl``, limits, receive rate, draining and store-acks, counted in the same
metrics. Each answer is sent after the store-ack; a refusal is a JSON error document
(``kiteq.broker.http_answers``). Requests refused before any message (credentials,
unparsable input) are counted in ``kiteq_rejected_frames_total`` and logged at most once
per peer and interval, as refused gRPC frames are; every request is counted in
``kiteq_http_requests_total{endpoint,code}``.

Transactions: a message published with ``transactional`` is stored uncommitted and
decided by ``:commit``/``:rollback`` of its own group (``TxManager.decide_for``, as a
session's TxAck). The broker's checks of an undecided message go to a live session of the
group (its ``tx_checker`` answers, as for the group's other messages); with none, they go
unanswered and after ``txCheckMax`` the message is *unresolved*: kept, listed by
``kiteq-admin tx -unresolved``, decided by an operator or still by the HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import HttpVersion11, hdrs, web

from kiteq.broker.credentials import check_credentials
from kiteq.broker.http_answers import (
    ApiError,
    error_document,
    failure,
    refusal,
    retry_after,
    success,
)
from kiteq.broker.http_request import (
    credentials,
    is_json,
    parse_batch,
    parse_json_message,
    parse_raw_message,
)
from kiteq.broker.rejections import Rejection, RejectionLog
from kiteq.core.codes import AckCode
from kiteq.core.config import ClusterConfig
from kiteq.core.errors import AuthenticationError, BodyTooLargeError, KiteQError
from kiteq.core.ids import canonical_message_id, is_message_id
from kiteq.core.limits import MAX_BATCH_BYTES, MAX_BODY_BYTES
from kiteq.core.message import TxStatus
from kiteq.handler.core import BrokerCore
from kiteq.handler.transactions import TxDecision
from kiteq.ops.http_site import HttpSite
from kiteq.ops.metrics import BrokerMetrics
from kiteq.ops.metrics.labels import HTTP_ENDPOINTS

__all__ = ["HttpPublishServer", "server_ssl_context"]

logger = logging.getLogger(__name__)

# request sizes read at most: a raw body is the message body; a JSON document may carry
# its body in base64 (4/3) or JSON string escapes, so it gets twice the body budget
MAX_RAW_BYTES: Final = MAX_BODY_BYTES
MAX_JSON_BYTES: Final = 2 * MAX_BODY_BYTES
MAX_BATCH_REQUEST_BYTES: Final = 2 * MAX_BATCH_BYTES
DEFAULT_MAX_REQUESTS: Final = 64
READ_SECONDS: Final = 30.0
KEEPALIVE_SECONDS: Final = 75.0
_ACTIONS: Final = {"commit": TxStatus.COMMIT, "rollback": TxStatus.ROLLBACK}
_DECIDED: Final = {TxStatus.COMMIT: "committed", TxStatus.ROLLBACK: "rolled_back"}
_CHALLENGE: Final = 'Basic realm="kiteq publish", charset="UTF-8"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(
    document: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(document, status=status, headers=headers)


def _peer(request: web.Request) -> str:
    """``http:<ip>:<port>``: the RejectionLog keys its lines by what precedes the port."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple):
        return f"http:{peer[0]}:{peer[1]}"
    return f"http:{peer}"


class HttpPublishServer:
    """Serves the HTTP publish API for one broker's pipeline.

    Args:
        host: Address to bind.
        port: TCP port; 0 picks a free one (``port`` after ``start()``).
        core: The broker's pipeline: its intake, transactions and store.
        rejections: Where refused requests are counted and logged (the gRPC servicer's).
        metrics: Counts requests by endpoint and status.
        ssl_context: Serve HTTPS with it; None: plain HTTP.
        max_requests: Requests handled at once; more are answered ``503 BUSY``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        core: BrokerCore,
        rejections: RejectionLog,
        metrics: BrokerMetrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_requests: int = DEFAULT_MAX_REQUESTS,
    ) -> None:
        self._host = host
        self._site = HttpSite(
            "HttpPublishServer", host, port, keepalive=KEEPALIVE_SECONDS, ssl_context=ssl_context
        )
        self._core = core
        self._rejections = rejections
        self._metrics = metrics
        self._ssl = ssl_context
        self._max_requests = max_requests
        self._active = 0

    @property
    def port(self) -> int:
        return self._site.port

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    async def start(self) -> None:
        """Bind and serve; returns once the port is bound.

        Raises:
            OSError: The address cannot be bound.
        """
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BATCH_REQUEST_BYTES)
        topic = "/v1/topics/{topic}/messages"
        app.router.add_post(topic, self._publish, name="publish", expect_handler=self._expect)
        app.router.add_post(
            f"{topic}:batch", self._batch, name="batch", expect_handler=self._expect
        )
        app.router.add_post(f"{topic}/{{id}}:{{action}}", self._decide, name="decide")
        await self._site.start(app)
        logger.info("http publish listening host=%s port=%d %s", self._host, self.port, self.scheme)

    async def stop(self) -> None:
        """Stop listening and end open connections; idempotent."""
        await self._site.stop()

    # -- every request -------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        response: web.StreamResponse
        if self._active >= self._max_requests:
            response = _json(
                error_document("BUSY", "too many requests at once", retriable=True),
                503,
                {hdrs.RETRY_AFTER: "1"},
            )
        else:
            self._active += 1
            try:
                response = await self._answer(request, handler)
            finally:
                self._active -= 1
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        self._count(request, response.status, time.monotonic() - started)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            status, document = failure(exc)
            return _json(document, status)
        except AuthenticationError as exc:
            return self._unauthenticated(request, str(exc))
        except KiteQError as exc:
            # input refused before any message reached the intake
            self._rejections.note(_peer(request), Rejection.INVALID_REQUEST, str(exc))
            status, document = failure(exc)
            return _json(document, status)
        except TimeoutError:
            self._rejections.note(_peer(request), Rejection.INVALID_REQUEST, "body read timeout")
            return _json(
                error_document("TIMEOUT", "the body did not arrive in time", retriable=True), 408
            )
        except web.HTTPException as exc:
            if exc.status == 405:
                code = "METHOD_NOT_ALLOWED"
            elif exc.status == 404:
                code = "NOT_FOUND"
            else:
                code = "INVALID_ARGUMENT"
            allow = exc.headers.get(hdrs.ALLOW)
            headers = {"Allow": allow} if allow is not None else None
            return _json(error_document(code, exc.reason, retriable=False), exc.status, headers)
        except Exception:
            logger.exception("http publish handler failed path=%s", request.path)
            return _json(error_document("INTERNAL", "internal error", retriable=True), 500)

    def _count(self, request: web.Request, status: int, seconds: float) -> None:
        if self._metrics is None:
            return
        route = request.match_info.route.name if request.match_info.http_exception is None else None
        if route == "decide":
            endpoint = request.match_info.get("action", "")
            endpoint = endpoint if endpoint in _ACTIONS else "other"
        else:
            endpoint = route if route in HTTP_ENDPOINTS else "other"
        self._metrics.http_request(endpoint, status, seconds)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse a body announced too large before it is sent."""
        limit = _limit(request)
        length = request.content_length
        if length is not None and length > limit:
            response = self._too_large(request, length, limit)
            self._count(request, response.status, 0.0)
            return response
        if (
            request.version == HttpVersion11
            and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    def _too_large(self, request: web.Request, size: int, limit: int) -> web.Response:
        error = BodyTooLargeError("", f"the request body of {size} bytes exceeds {limit}")
        self._rejections.note(_peer(request), Rejection.INVALID_REQUEST, error.reason)
        status, document = failure(error)
        return _json(document, status)

    def _unauthenticated(self, request: web.Request, detail: str) -> web.Response:
        self._rejections.note(_peer(request), Rejection.UNAUTHENTICATED, detail)
        return _json(
            error_document("UNAUTHENTICATED", detail, retriable=False),
            401,
            {hdrs.WWW_AUTHENTICATE: _CHALLENGE},
        )

    def _authenticate(self, request: web.Request) -> str:
        """The request's group, its secret checked as a session's.

        Raises:
            ApiError: 400 for an invalid group name; 401 (answered by ``_answer``) for a
                wrong or missing secret.
        """
        group, secret = credentials(request.headers.items())
        refused = check_credentials(self._core.config, group, secret)
        if refused is Rejection.INVALID_OPEN:
            self._rejections.note(
                _peer(request), Rejection.INVALID_REQUEST, f"group {group[:64]!r}"
            )
            raise ApiError(400, "INVALID_ARGUMENT", f"invalid group id {group[:64]!r}")
        if refused is not None:
            raise AuthenticationError(f"wrong secret for group {group[:64]!r}")
        return group

    async def _body(self, request: web.Request) -> bytes:
        """The request body, read up to its endpoint's limit within ``READ_SECONDS``.

        Raises:
            BodyTooLargeError: Longer than the limit (the rest is not read).
            TimeoutError: It did not arrive in time.
        """
        limit = _limit(request)
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLargeError("", f"the request body of {length} bytes exceeds {limit}")
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(READ_SECONDS):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError("", f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    # -- the endpoints -------------------------------------------------------------------

    async def _publish(self, request: web.Request) -> web.Response:
        group = self._authenticate(request)
        body = await self._body(request)
        headers = request.headers.items()
        if is_json(request.content_type):
            draft = parse_json_message(body, headers)
        else:
            draft = parse_raw_message(body, headers)
        message = draft.message(request.match_info["topic"], group)
        [ack] = await self._core.intake.publish([message], group=group)
        if ack.ok:
            return _json(
                success(
                    message.message_id,
                    ack,
                    committed=message.commit,
                    scheduled=message.deliver_at > 0,
                )
            )
        status, document = refusal(ack)
        document["error"]["id"] = message.message_id
        return _json(document, status, self._retry_headers(ack.code, 1))

    async def _batch(self, request: web.Request) -> web.Response:
        group = self._authenticate(request)
        body = await self._body(request)
        if not is_json(request.content_type):
            raise ApiError(
                415, "INVALID_ARGUMENT", "a batch is a JSON array: Content-Type: application/json"
            )
        topic = request.match_info["topic"]
        messages = [d.message(topic, group) for d in parse_batch(body, request.headers.items())]
        acks = await self._core.intake.publish(messages, group=group)
        results: list[dict[str, Any]] = []
        counts = {"stored": 0, "scheduled": 0, "duplicate": 0, "failed": 0}
        overflowed = 0
        for message, ack in zip(messages, acks, strict=True):
            if ack.ok:
                result = success(
                    message.message_id,
                    ack,
                    committed=message.commit,
                    scheduled=message.deliver_at > 0,
                )
                counts[result["status"]] = counts.get(result["status"], 0) + 1
            else:
                status, result = refusal(ack)
                result = {"id": message.message_id, "httpStatus": status, **result}
                counts["failed"] += 1
                overflowed += ack.code is AckCode.OVERFLOW
            results.append(result)
        headers = self._retry_headers(AckCode.OVERFLOW, overflowed) if overflowed else None
        return _json({"results": results, **counts}, 200, headers)

    async def _decide(self, request: web.Request) -> web.Response:
        status = _ACTIONS.get(request.match_info["action"])
        if status is None:
            raise web.HTTPNotFound()
        group = self._authenticate(request)
        sent_id = request.match_info["id"]
        message_id = canonical_message_id(sent_id)
        if not is_message_id(message_id):
            raise ApiError(400, "INVALID_ARGUMENT", "a message id is 32 hex characters")
        topic = request.match_info["topic"]
        record = await self._core.store.get(message_id)
        if record is None or record.topic != topic:
            raise ApiError(
                404, "NOT_FOUND", f"no message {message_id} of topic {topic!r} is stored"
            )
        if record.message.group_id != group:
            self._rejections.note(_peer(request), Rejection.DENIED_TX, f"group={group}: 1 decision")
            raise ApiError(
                403, "PERMISSION_DENIED", f"group {group!r} did not publish this message"
            )
        if record.message.commit:
            raise ApiError(
                409, "ALREADY_DECIDED", "the message is committed already: decisions are final"
            )
        source = f"http {_peer(request)}"
        decision = await self._core.transactions.decide_for(group, message_id, status, source)
        if decision is TxDecision.APPLIED:
            return _json({"id": message_id, "status": _DECIDED[status]})
        if decision is TxDecision.DENIED:
            raise ApiError(
                403, "PERMISSION_DENIED", f"group {group!r} did not publish this message"
            )
        raise ApiError(
            409, "ALREADY_DECIDED", "the message was decided already: decisions are final"
        )

    def _retry_headers(self, code: AckCode, messages: int) -> dict[str, str] | None:
        after = retry_after(code, messages, self._core.config.recieve_permits_per_second)
        return {hdrs.RETRY_AFTER: after} if after is not None else None


def server_ssl_context(config: ClusterConfig) -> ssl.SSLContext | None:
    """HTTPS with the gRPC port's certificate and key (mTLS with its client CA).

    None when the cluster has no TLS. Its files were checked at start-up by
    ``load_server_tls``.
    """
    if not (config.tls_cert and config.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _limit(request: web.Request) -> int:
    """The body limit of *request*'s endpoint and content type."""
    if request.match_info.route.name == "batch":
        return MAX_BATCH_REQUEST_BYTES
    return MAX_JSON_BYTES if is_json(request.content_type) else MAX_RAW_BYTES
