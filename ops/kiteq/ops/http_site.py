"""One aiohttp application served on a host and port: what the broker's HTTP servers share.

The ops port (``kiteq.ops.http``) and the HTTP publish API (``kiteq.broker.http_publish``)
each build their own application and routes; binding it, the bound port (the real one
when 0 was asked for), the request-size limits, the ``Server`` header and the shutdown
are the same and live here.
"""

from __future__ import annotations

import ssl
from typing import Final

from aiohttp import web

__all__ = ["MAX_HEADERS", "MAX_LINE_BYTES", "HttpSite"]

MAX_LINE_BYTES: Final = 8190
MAX_HEADERS: Final = 100
SHUTDOWN_SECONDS: Final = 1.0


class HttpSite:
    """*app* (given to ``start``) on *host*:*port*, with TLS when *ssl_context* is set.

    *name* is the owner's, for the error of a second start or of ``port`` before one.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        keepalive: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._name = name
        self._host = host
        self._requested_port = port
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError(f"{self._name} is not started")
        port: int = self._runner.addresses[0][1]
        return port

    async def start(self, app: web.Application) -> None:
        """Bind and serve *app*; returns once the port is bound.

        Raises:
            OSError: The address cannot be bound (e.g. the port is in use).
        """
        if self._runner is not None:
            raise RuntimeError(f"{self._name} already started")
        app.on_response_prepare.append(_name_the_server)
        runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=self._keepalive,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        await runner.setup()
        site = web.TCPSite(
            runner, self._host, self._requested_port, reuse_address=True, ssl_context=self._ssl
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> bool:
        """Stop listening and end open connections; False when it was not serving."""
        runner, self._runner = self._runner, None
        if runner is None:
            return False
        await runner.cleanup()
        return True


async def _name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    # instead of aiohttp's default, which names the Python and aiohttp versions
    response.headers["Server"] = "kiteq"
