"""The HTTP side of webhook groups (``kiteq.handler.webhook``): one pooled aiohttp client.

One ``ClientSession`` per broker: its connector keeps connections to each endpoint alive
between calls (HTTP/1.1 keep-alive), so a busy group reuses a handful of connections
instead of a handshake per message. Redirects are never followed (a 3xx would lead
outside ``webhookAllow``), proxies from the environment are not used, and the answer's
body is read only up to a bound (and discarded) so that the connection goes back to the
pool.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Sequence
from typing import Final

import aiohttp

from kiteq.handler.webhook import WebhookAnswer, WebhookCallError

__all__ = ["AiohttpWebhookCaller"]

_USER_AGENT: Final = "kiteq-webhook/1"
# an answer body beyond this is not read: the connection is closed instead of reused
_MAX_ANSWER_BYTES: Final = 64 * 1024
# a Retry-After beyond this is taken as this (the message's expiry still bounds it)
_MAX_RETRY_AFTER: Final = 3600.0
# statuses whose Retry-After asks the redelivery to wait
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


class AiohttpWebhookCaller:
    """``WebhookCaller`` over one aiohttp session, created on first use (on the loop)."""

    def __init__(self, *, connections_per_host: int = 0) -> None:
        self._per_host = connections_per_host
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # the sinks' credits bound the calls in flight; 0 = no extra limit here
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._per_host)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": _USER_AGENT},
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, timeout: float
    ) -> WebhookAnswer:
        request_headers = [*headers, ("Content-Type", "application/octet-stream")]
        try:
            async with asyncio.timeout(timeout):
                async with self._client().post(
                    url, data=body, headers=request_headers, allow_redirects=False
                ) as response:
                    await _drain(response)
                    return WebhookAnswer(response.status, _retry_after(response))
        except TimeoutError:
            raise WebhookCallError(f"no answer within {timeout:g}s", timed_out=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WebhookCallError(_describe(exc)) from None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read the answer's body (bounded): a fully read answer lets the connection be reused."""
    read = 0
    while read <= _MAX_ANSWER_BYTES:
        chunk = await response.content.read(16 * 1024)
        if not chunk:
            return
        read += len(chunk)
    response.close()  # too long to read: give up the connection instead


def _retry_after(response: aiohttp.ClientResponse) -> float:
    """Seconds the answer's ``Retry-After`` asks for (429 and 503 only); 0 when none."""
    if response.status not in _RETRY_AFTER_STATUSES:
        return 0.0
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return 0.0
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return min(max(0.0, when.timestamp() - time.time()), _MAX_RETRY_AFTER)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
