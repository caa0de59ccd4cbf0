"""A webhook endpoint for the tests: an aiohttp server on loopback, in a thread of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Self

from aiohttp import web

from tests.waiting import wait_until

# answers a call: the HTTP status (the endpoint may also sleep first, as a hung one does)
Answer = Callable[["Call"], Awaitable[int]]


@dataclasses.dataclass(frozen=True)
class Call:
    """One request the endpoint got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    peer: tuple[str, int]

    @property
    def message_id(self) -> str:
        return self.headers["X-KiteQ-Message-Id"]

    @property
    def attempt(self) -> int:
        return int(self.headers["X-KiteQ-Attempt"])


async def ok(_: Call) -> int:
    return 200


class HookServer:
    """``with HookServer(answer) as hooks``: ``hooks.url(path)``, ``hooks.calls``."""

    def __init__(self, answer: Answer = ok) -> None:
        self.answer = answer
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str = "/hooks/mail") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def received(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def wait_count(self, n: int, timeout: float = 30.0) -> list[Call]:
        wait_until(lambda: len(self.received()) >= n, timeout, f"{n} webhook calls")
        return self.received()

    async def _handle(self, request: web.Request) -> web.Response:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else ("", 0)
        call = Call(
            request.path,
            dict(request.headers),
            await request.read(),
            time.monotonic(),
            tuple(peer[:2]),
        )
        with self._lock:
            self.calls.append(call)
        return web.Response(status=await self.answer(call))

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
