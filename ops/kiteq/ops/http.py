"""The broker's operations HTTP endpoint (``-pport``), served by aiohttp.

==================  ======================================================================
``/metrics``        Prometheus text format 0.0.4 (``BrokerMetrics.render()``)
``/stat``           KiteQ's ``/stat`` JSON (``StatsSource.stat_snapshot()``)
``/binds``          KiteQ's ``/binds`` JSON (``StatsSource.binds_snapshot()``)
``/healthz``        liveness: store and background loops (``kiteq.ops.health``), JSON
``/readyz``         readiness: also registered, accepting, registry connected
``/``               the management console (``kiteq.ops.console``): a static page
``/console/<f>``    the console's script and style sheet
``/api/...``        the console's JSON reads (``GET``) and actions (``POST``)
==================  ======================================================================

With an admin secret, ``/stat``, ``/binds`` and ``/api/...`` (they name clients, peers,
groups and messages) answer ``401`` unless the request carries it: ``Authorization:
Bearer <secret>`` (what the console's login form sends), or Basic credentials whose
password is the secret. ``/metrics``, ``/healthz`` and ``/readyz`` stay open for scrapers
and probes, and so does the console's page, which holds no data. Each refused request and each
console action is one line on the audit logger (``kiteq.audit``); a dry run changes
nothing and writes none.

Actions take a JSON body (``Content-Type: application/json``): a cross-site form cannot
send one, so a browser holding Basic credentials cannot be made to act by another site.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, Self

from aiohttp import web

from kiteq.core.admin import audit, secret_matches
from kiteq.ops.console import (
    ConsoleConflictError,
    ConsoleInputError,
    ConsoleSource,
    Redrive,
    Resolution,
    static_files,
)
from kiteq.ops.health import HealthSource, healthz, readyz
from kiteq.ops.http_site import HttpSite
from kiteq.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, BrokerMetrics

__all__ = ["OpsServer", "StatsSource"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 256 * 1024  # an action's JSON: ids and a filter
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 64
DEFAULT_LIMIT: Final = 100
# paths that reveal clients, peers or messages: behind the admin secret when there is one
PROTECTED_PATHS: Final = frozenset({"/stat", "/binds"})
PROTECTED_PREFIX: Final = "/api/"
_CHALLENGE: Final = 'Basic realm="kiteq admin", charset="UTF-8"'
_STATIC: Final = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
# The page runs only its own script and style and talks only to this origin.
_PAGE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FILTER_KEYS: Final = ("topic", "type", "group", "reason")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatsSource(Protocol):
    """Where ``/stat`` and ``/binds`` come from (the broker implements it).

    Both are called on the event loop, must be cheap and must return JSON-serialisable
    data with KiteQ's keys.
    """

    def stat_snapshot(self) -> dict[str, Any]:
        """KiteQ's ``/stat`` document: ``{"kiteq": {...}, "network": {...}}``."""
        ...

    def binds_snapshot(self) -> dict[str, Any]:
        """KiteQ's ``/binds`` document: ``{"topic_2_groups": ..., "topic_limiters": ...}``."""
        ...


def _credential(authorization: str) -> str | None:
    """The secret in an ``Authorization`` value: a Bearer token or a Basic password."""
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def _text(status: int, detail: str = "", headers: Mapping[str, str] | None = None) -> web.Response:
    reason = web.Response(status=status).reason
    return web.Response(
        status=status,
        text=f"{status} {detail or reason}\n",
        content_type="text/plain",
        headers=headers,
    )


def _json(document: object, status: int = 200) -> web.Response:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    return web.Response(status=status, text=body, content_type="application/json")


def _found(document: object | None) -> web.Response:
    """*document* as JSON; 404 when the console source knows no such thing (None)."""
    if document is None:
        raise web.HTTPNotFound()
    return _json(document)


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class OpsServer:
    """Serves ``/metrics``, ``/stat``, ``/binds``, ``/healthz`` and the console.

    Args:
        host: Address to bind (``127.0.0.1``, ``0.0.0.0``, ...).
        port: TCP port; 0 picks a free one (read it from ``port`` after ``start()``).
        metrics: The broker's metrics.
        source: Provides the ``/stat`` and ``/binds`` documents.
        console: Provides the console's data and actions; None: ``/api/...`` is 404.
        timeout: Seconds an idle keep-alive connection stays open.
        max_connections: Requests served at once; more get ``503``.
        admin_secret: When set, ``/stat``, ``/binds`` and ``/api/...`` require it.
        health: What ``/healthz`` and ``/readyz`` report (``kiteq.ops.health``); None:
            both answer ``ok``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: BrokerMetrics,
        source: StatsSource,
        *,
        console: ConsoleSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        admin_secret: str = "",
        health: HealthSource | None = None,
    ) -> None:
        self._admin_secret = admin_secret
        self._health = health
        self._host = host
        self._site = HttpSite("OpsServer", host, port, keepalive=timeout)
        self._metrics = metrics
        self._source = source
        self._console = console
        self._max_connections = max_connections
        self._active = 0
        static = static_files()
        self._page = (static / "index.html").read_bytes()
        self._assets = {name: (static / name).read_bytes() for name in _STATIC}

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when 0 was asked for)."""
        return self._site.port

    async def start(self) -> None:
        """Bind and start serving; returns once the port is bound.

        Raises:
            OSError: The address cannot be bound (e.g. the port is in use).
        """
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        self._add_routes(app)
        await self._site.start(app)
        logger.info("ops http listening host=%s port=%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening and end open connections; idempotent."""
        if await self._site.stop():
            logger.info("ops http stopped host=%s", self._host)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- routing -----------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        reads: dict[str, Handler] = {
            "/": self._index,
            "/metrics": self._render_metrics,
            "/stat": self._stat,
            "/binds": self._binds,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/console/{name}": self._asset,
        }
        if self._console is not None:
            reads |= {
                "/api/overview": self._overview,
                "/api/groups": self._groups,
                "/api/groups/{group}": self._group,
                "/api/dlq": self._dead_letters,
                "/api/transactions": self._transactions,
                "/api/messages/{id}": self._message,
            }
            app.router.add_post("/api/dlq/redrive", self._redrive)
            app.router.add_post("/api/transactions/{id}/{resolution}", self._resolve)
        for path, handler in reads.items():
            app.router.add_get(path, handler)  # HEAD too

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._active >= self._max_connections:
            return _text(503)
        self._active += 1
        try:
            refused = self._authorize(request)
            response = refused or await self._answer(request, handler)
        finally:
            self._active -= 1
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @staticmethod
    async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 405:
                allow = exc.headers.get("Allow", "")
                return _text(405, headers={"Allow": allow})
            return _text(exc.status)
        except ConsoleConflictError as exc:
            return _text(409, str(exc))
        except ConsoleInputError as exc:
            return _text(400, str(exc))
        except Exception:
            logger.exception("ops http handler failed path=%s", request.path)
            return _text(500)

    def _authorize(self, request: web.Request) -> web.Response | None:
        """None when the request may go on, else the ``401`` answer."""
        path = request.path
        if not self._admin_secret or not (
            path in PROTECTED_PATHS or path.startswith(PROTECTED_PREFIX)
        ):
            return None
        authorization = request.headers.get("Authorization")
        given = _credential(authorization) if authorization is not None else None
        if given and secret_matches(given, self._admin_secret):
            return None
        audit.warning(
            "admin auth failed peer=%s path=%s reason=%s",
            _peer(request),
            path,
            "wrong secret" if given else "no secret",
        )
        if path.startswith(PROTECTED_PREFIX):
            # no Basic challenge: a browser would open its own password prompt over the
            # console's login form (and hold the page's request until it is answered)
            return _text(401, "admin secret required")
        return _text(401, "admin secret required", {"WWW-Authenticate": _CHALLENGE})

    # -- the KiteQ and Prometheus endpoints --------------------------------------------

    async def _render_metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def _stat(self, request: web.Request) -> web.Response:
        return _json(self._source.stat_snapshot())

    async def _binds(self, request: web.Request) -> web.Response:
        return _json(self._source.binds_snapshot())

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._health is None:
            return web.Response(text="ok\n", content_type="text/plain")
        status, body = healthz(self._health.health_report())
        return _json(body, status)

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._health is None:
            return web.Response(text="ok\n", content_type="text/plain")
        status, body = readyz(self._health.health_report())
        return _json(body, status)

    async def _index(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._page, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = _PAGE_CSP
        return response

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets:
            raise web.HTTPNotFound()
        response = web.Response(body=self._assets[name])
        response.headers["Content-Type"] = _STATIC[name]
        return response

    # -- the console's API -------------------------------------------------------------

    @property
    def _data(self) -> ConsoleSource:
        if self._console is None:  # the routes exist only with a console
            raise RuntimeError("no console source")
        return self._console

    async def _overview(self, request: web.Request) -> web.Response:
        return _json(await self._data.overview())

    async def _groups(self, request: web.Request) -> web.Response:
        return _json(await self._data.groups())

    async def _group(self, request: web.Request) -> web.Response:
        return _found(await self._data.group(request.match_info["group"]))

    async def _dead_letters(self, request: web.Request) -> web.Response:
        query = request.query
        after = (query["after"], query.get("afterGroup", "")) if query.get("after") else None
        where = {key: query.get(key, "") for key in _FILTER_KEYS}
        return _json(await self._data.dead_letters(where, _limit(query), after))

    async def _transactions(self, request: web.Request) -> web.Response:
        query = request.query
        unresolved = query.get("unresolved", "") in ("1", "true")
        found = await self._data.transactions(
            unresolved_only=unresolved, limit=_limit(query), after=query.get("after", "")
        )
        return _json(found)

    async def _message(self, request: web.Request) -> web.Response:
        return _found(await self._data.message(request.match_info["id"]))

    async def _redrive(self, request: web.Request) -> web.Response:
        body = await _action_body(request)
        raw_filter = body.get("filter") or {}
        ids = body.get("ids") or []
        group = body.get("group", "")
        dry_run = body.get("dryRun", False)
        expect = body.get("expect")
        if not (
            isinstance(raw_filter, dict)
            and all(isinstance(raw_filter.get(k, ""), str) for k in _FILTER_KEYS)
            and isinstance(ids, list)
            and all(isinstance(i, str) for i in ids)
            and isinstance(group, str)
            and isinstance(dry_run, bool)
            and (expect is None or (isinstance(expect, int) and not isinstance(expect, bool)))
        ):
            raise ConsoleInputError(
                "expected {filter: {topic, type, group, reason}, ids, group, dryRun, expect}"
            )
        where = {key: raw_filter.get(key, "") for key in _FILTER_KEYS}
        result = await self._data.redrive(
            Redrive(where, ids, group, dry_run=dry_run, expect=expect)
        )
        if not dry_run:
            if ids:
                audit.info(
                    "admin redrive via=console peer=%s ids=%d group=%s redriven=%d",
                    _peer(request),
                    len(ids),
                    group or "*",
                    result["redriven"],
                )
            else:
                audit.info(
                    "admin redrive via=console peer=%s filter=%s redriven=%d",
                    _peer(request),
                    ",".join(f"{k}:{where[k] or '*'}" for k in _FILTER_KEYS),
                    result["redriven"],
                )
        return _json(result)

    async def _resolve(self, request: web.Request) -> web.Response:
        await _action_body(request)
        try:
            resolution = Resolution(request.match_info["resolution"])
        except ValueError:
            raise web.HTTPNotFound() from None
        message_id = request.match_info["id"]
        result = await self._data.resolve(message_id, resolution)
        audit.info(
            "admin %s via=console peer=%s id=%s changed=%s",
            resolution.value,
            _peer(request),
            message_id,
            result["changed"],
        )
        return _json(result)


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit", "")
    if not raw:
        return DEFAULT_LIMIT
    if not raw.isdigit() or int(raw) == 0:
        raise ConsoleInputError(f"limit must be a positive integer, not {raw!r}")
    return int(raw)


async def _action_body(request: web.Request) -> dict[str, Any]:
    """The JSON object an action carries; refuses anything a plain form could send."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType()
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ConsoleInputError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ConsoleInputError("the body must be a JSON object")
    return body
