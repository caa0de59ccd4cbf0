"""The broker's operations HTTP endpoint (``-pport``): metrics, KiteQ JSON, an ops page.

A deliberately small HTTP/1.1 server on ``asyncio.start_server``: ``GET`` (and ``HEAD``)
only, one request per connection (``Connection: close``), no request bodies, bounded
request line and headers, a deadline per connection and a cap on concurrent connections.

==============  ==========================================================================
``/metrics``    Prometheus text format 0.0.4 (``BrokerMetrics.render()``)
``/stat``       KiteQ's ``/stat`` JSON (``StatsSource.stat_snapshot()``)
``/binds``      KiteQ's ``/binds`` JSON (``StatsSource.binds_snapshot()``)
``/healthz``    ``ok``
``/``           a self-contained page that shows ``/stat`` and ``/binds``, refreshed
==============  ==========================================================================

With an admin secret, ``/stat``, ``/binds`` and ``/`` (they name clients, peers and groups)
answer ``401`` unless the request carries it: ``Authorization: Bearer <secret>``, or Basic
credentials whose password is the secret (what a browser asks for after the ``401``, and
then sends with the page's own requests). ``/metrics`` and ``/healthz`` stay open for
scrapers and probes. Each refused request is one line on the audit logger.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Protocol, Self
from urllib.parse import urlsplit

from kiteq.core.admin import audit, secret_matches
from kiteq.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, BrokerMetrics

__all__ = ["OpsServer", "StatsSource"]

logger = logging.getLogger(__name__)

MAX_LINE_BYTES: Final = 8192
MAX_HEADER_BYTES: Final = 32 * 1024
MAX_HEADERS: Final = 100
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 64
LINGER_SECONDS: Final = 1.0
ALLOWED_METHODS: Final = ("GET", "HEAD")
# paths that reveal clients, peers or messages: behind the admin secret when there is one
PROTECTED_PATHS: Final = frozenset({"/", "/stat", "/binds"})
_CHALLENGE: Final = 'Basic realm="kiteq admin", charset="UTF-8"'


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


class _HTTPError(Exception):
    """Ends a request with *status*; the message becomes the plain-text body."""

    def __init__(self, status: HTTPStatus, detail: str = "") -> None:
        super().__init__(detail or status.phrase)
        self.status = status
        self.detail = detail or status.phrase


_PAGE_SCRIPT: Final = """
const sections = ["stat", "binds"];
function render(value) {
  if (value === null || typeof value !== "object") {
    return document.createTextNode(String(value));
  }
  if (Array.isArray(value)) {
    return document.createTextNode(
      value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", "));
  }
  const keys = Object.keys(value).sort();
  if (keys.length === 0) {
    return document.createTextNode("(none)");
  }
  const table = document.createElement("table");
  for (const key of keys) {
    const row = table.insertRow();
    const name = row.insertCell();
    name.className = "key";
    name.textContent = key;
    row.insertCell().append(render(value[key]));
  }
  return table;
}
async function refresh() {
  const status = document.getElementById("status");
  try {
    for (const name of sections) {
      const response = await fetch(name, {cache: "no-store"});
      if (!response.ok) {
        throw new Error(name + ": HTTP " + response.status);
      }
      document.getElementById(name).replaceChildren(render(await response.json()));
    }
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (error) {
    status.textContent = "refresh failed: " + error.message;
    status.className = "error";
  }
}
refresh();
setInterval(refresh, 3000);
"""

_PAGE_STYLE: Final = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.2em 0; }
td { border: 1px solid #ccc; padding: 0.2em 0.5em; vertical-align: top; }
td.key { font-weight: 600; background: #f5f5f5; }
#status { color: #666; } #status.error { color: #b00; }
"""

_PAGE: Final = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>KiteQ broker</title>
<style>{_PAGE_STYLE}</style>
</head>
<body>
<h1>KiteQ broker</h1>
<p><span id="status">loading…</span> ·
<a href="metrics">metrics</a> · <a href="stat">stat</a> · <a href="binds">binds</a></p>
<h2>stat</h2>
<div id="stat"></div>
<h2>binds</h2>
<div id="binds"></div>
<script>{_PAGE_SCRIPT}</script>
</body>
</html>
""".encode()


def _csp_hash(source: str) -> str:
    digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
    return f"'sha256-{digest}'"


# Only the page's own inline script and style may run; it may fetch only from this origin.
_PAGE_CSP: Final = (
    f"default-src 'none'; script-src {_csp_hash(_PAGE_SCRIPT)}; "
    f"style-src {_csp_hash(_PAGE_STYLE)}; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_Response = tuple[HTTPStatus, str, bytes, dict[str, str]]


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


class OpsServer:
    """Serves ``/metrics``, ``/stat``, ``/binds``, ``/healthz`` and ``/`` over HTTP/1.1.

    Args:
        host: Address to bind (``127.0.0.1``, ``0.0.0.0``, ...).
        port: TCP port; 0 picks a free one (read it from ``port`` after ``start()``).
        metrics: The broker's metrics.
        source: Provides the ``/stat`` and ``/binds`` documents.
        timeout: Seconds a client has to send its request and read the response.
        max_connections: Connections served at once; more get ``503``.
        admin_secret: When set, ``/stat``, ``/binds`` and ``/`` require it (see above).
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: BrokerMetrics,
        source: StatsSource,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        admin_secret: str = "",
    ) -> None:
        self._admin_secret = admin_secret
        self._host = host
        self._requested_port = port
        self._metrics = metrics
        self._source = source
        self._timeout = timeout
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, asyncio.Future[None]] = {}
        self._routes: dict[str, Callable[[], _Response]] = {
            "/": self._page,
            "/metrics": self._render_metrics,
            "/stat": lambda: self._json(self._source.stat_snapshot()),
            "/binds": lambda: self._json(self._source.binds_snapshot()),
            "/healthz": lambda: (HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n", {}),
        }

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("OpsServer is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start serving; returns once the port is bound.

        Raises:
            OSError: The address cannot be bound (e.g. the port is in use).
        """
        if self._server is not None:
            raise RuntimeError("OpsServer already started")
        self._server = await asyncio.start_server(
            self._handle,
            self._host,
            self._requested_port,
            limit=MAX_LINE_BYTES,
            reuse_address=True,
        )
        logger.info("ops http listening host=%s port=%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening and end open connections; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Closing a transport ends its handler at the next read or write; a client that
        # does not read what is still buffered gets the connection aborted.
        for writer in list(self._connections):
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections.values()), timeout=LINGER_SECONDS)
        for writer in list(self._connections):
            writer.transport.abort()
        await asyncio.gather(*self._connections.values())
        await server.wait_closed()
        logger.info("ops http stopped host=%s", self._host)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connections[writer] = done
        try:
            async with asyncio.timeout(self._timeout):
                if len(self._connections) > self._max_connections:
                    busy = self._error(HTTPStatus.SERVICE_UNAVAILABLE)
                    await self._send(writer, busy, head=False)
                else:
                    await self._serve(reader, writer)
                await self._linger(reader, writer)
        except (TimeoutError, ConnectionError):
            pass  # a slow or vanished client: nothing to answer
        except Exception:
            logger.exception("ops http connection failed")
        finally:
            del self._connections[writer]
            done.set_result(None)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(LINGER_SECONDS):
                    await writer.wait_closed()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard input until the client closes (or a short while).

        Closing a socket that has unread input makes the kernel send a reset, which can
        destroy the response before the client reads it (after a 503 or 431, say).
        """
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await reader.read(MAX_HEADER_BYTES):
                    pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = False
        try:
            method, path, authorization = await self._read_request(reader)
            head = method == "HEAD"
            response = self._authorize(path, authorization, writer) or self._route(method, path)
        except _HTTPError as exc:
            response = self._error(exc.status, exc.detail)
        await self._send(writer, response, head=head)

    def _authorize(
        self, path: str, authorization: str | None, writer: asyncio.StreamWriter
    ) -> _Response | None:
        """None when the request may go on, else the ``401`` answer."""
        if not self._admin_secret or path not in PROTECTED_PATHS:
            return None
        given = _credential(authorization) if authorization is not None else None
        if given and secret_matches(given, self._admin_secret):
            return None
        peer = writer.get_extra_info("peername")
        audit.warning(
            "admin auth failed peer=%s path=%s reason=%s",
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else peer,
            path,
            "wrong secret" if given else "no secret",
        )
        status, ctype, body, headers = self._error(HTTPStatus.UNAUTHORIZED, "admin secret required")
        return status, ctype, body, {**headers, "WWW-Authenticate": _CHALLENGE}

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, str | None]:
        line = await self._read_line(reader, HTTPStatus.REQUEST_URI_TOO_LONG)
        parts = line.split(" ")
        if len(parts) != 3 or not all(parts):
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            if version.startswith("HTTP/"):
                raise _HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed request line")
        total = len(line)
        authorization: str | None = None
        for _ in range(MAX_HEADERS + 1):
            header = await self._read_line(reader, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if not header:
                break
            total += len(header)
            if total > MAX_HEADER_BYTES:
                raise _HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            name, sep, value = header.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed header")
            if name.lower() == "authorization":
                authorization = value
        else:
            raise _HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        if target.startswith("/"):
            path = urlsplit(target).path
        elif target.startswith(("http://", "https://")):
            path = urlsplit(target).path or "/"
        else:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "bad request target")
        return method, path, authorization

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader, too_long: HTTPStatus) -> str:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            raise _HTTPError(too_long) from exc
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("client closed mid-request") from exc
        try:
            return raw.decode("ascii").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "non-ASCII request") from exc

    def _route(self, method: str, path: str) -> _Response:
        handler = self._routes.get(path)
        if handler is None:
            raise _HTTPError(HTTPStatus.NOT_FOUND)
        if method not in ALLOWED_METHODS:
            status, ctype, body, headers = self._error(HTTPStatus.METHOD_NOT_ALLOWED)
            return status, ctype, body, {**headers, "Allow": ", ".join(ALLOWED_METHODS)}
        try:
            return handler()
        except Exception:
            logger.exception("ops http handler failed path=%s", path)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _render_metrics(self) -> _Response:
        return HTTPStatus.OK, METRICS_CONTENT_TYPE, self._metrics.render(), {}

    @staticmethod
    def _json(document: dict[str, Any]) -> _Response:
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        return HTTPStatus.OK, "application/json; charset=utf-8", body, {}

    @staticmethod
    def _page() -> _Response:
        return (
            HTTPStatus.OK,
            "text/html; charset=utf-8",
            _PAGE,
            {"Content-Security-Policy": _PAGE_CSP},
        )

    @staticmethod
    def _error(status: HTTPStatus, detail: str = "") -> _Response:
        body = f"{status.value} {detail or status.phrase}\n".encode()
        return status, "text/plain; charset=utf-8", body, {}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: _Response, *, head: bool) -> None:
        status, ctype, body, extra = response
        headers = {
            "Content-Type": ctype,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Connection": "close",
            **extra,
        }
        lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)
        await writer.drain()
