from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiteq.ops.http import OpsServer, StatsSource
from kiteq.ops.metrics import BrokerMetrics

STAT: dict[str, Any] = {
    "kiteq": {
        "goroutine": 12,
        "deliver_go": 3,
        "deliver_count": 100,
        "recieve_count": 120,
        "message_count": {"trade": 5, "user-profile": 0},
        "topics_deliver": {"trade": 10},
        "topics_recieve": {"trade": 12},
        "groups": {"pay-svc": ["127.0.0.1:50000"]},
        "accept_limiter": [7, 20000],
    },
    "network": {"connections": 2, "read_count": 1, "read_bytes": 2},
}
BINDS: dict[str, Any] = {
    "topic_2_groups": {"trade": ["pay-svc", "acct-svc"]},
    "topic_limiters": {"trade": {"pay-svc": [0, 6000]}},
}


class FakeSource:
    def __init__(self) -> None:
        self.fail = False

    def stat_snapshot(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("boom")
        return STAT

    def binds_snapshot(self) -> dict[str, Any]:
        return BINDS


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _reason = lines[0].split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0")  # aiohttp answers unparsable requests in 1.0
        self.status = int(status)
        self.headers = {
            name.lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }

    @property
    def text(self) -> str:
        return self.body.decode()


async def exchange(port: int, raw: bytes, *, timeout: float = 5.0) -> bytes:
    """Send *raw* bytes, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def send(
    port: int, method: str, path: str, headers: Sequence[str] = (), body: bytes = b""
) -> Response:
    """One HTTP/1.1 request with *headers* (``"Name: value"``) and *body*, and its answer."""
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close", *headers]
    return Response(await exchange(port, ("\r\n".join(head) + "\r\n\r\n").encode() + body))


async def get(port: int, path: str, method: str = "GET") -> Response:
    return await send(port, method, path, ["User-Agent: test"])


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
async def server(touched_metrics: BrokerMetrics, source: FakeSource) -> AsyncIterator[OpsServer]:
    async with OpsServer("127.0.0.1", 0, touched_metrics, source, timeout=2.0) as ops:
        yield ops


def test_fake_source_satisfies_the_protocol(source: FakeSource) -> None:
    typed: StatsSource = source
    assert typed.binds_snapshot() == BINDS


async def test_metrics(server: OpsServer) -> None:
    response = await get(server.port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(response.headers["content-length"]) == len(response.body)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["server"] == "kiteq"  # no library or Python version
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert "kiteq_messages_received" in names


async def test_metrics_through_a_standard_client(server: OpsServer) -> None:
    url = f"http://127.0.0.1:{server.port}/metrics?debug=1"

    def fetch() -> tuple[int, bytes]:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()

    status, body = await asyncio.to_thread(fetch)
    assert status == 200
    assert b"kiteq_store_backlog_messages" in body


@pytest.mark.parametrize(("path", "document"), [("/stat", STAT), ("/binds", BINDS)])
async def test_kiteq_json(server: OpsServer, path: str, document: dict[str, Any]) -> None:
    response = await get(server.port, path)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(response.body) == document


async def test_healthz(server: OpsServer) -> None:
    response = await get(server.port, "/healthz")
    assert response.status == 200
    assert response.text == "ok\n"


async def test_console_page_is_self_contained(server: OpsServer) -> None:
    response = await get(server.port, "/")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    assert page.startswith("<!DOCTYPE html>")
    # No external assets: only the console's own script and style sheet, relative URLs.
    assert "http://" not in page
    assert "https://" not in page
    assert set(re.findall(r'src="([^"]*)"', page)) == {"console/console.js"}
    assert 'href="console/console.css"' in page
    assert "<script>" not in page  # nothing inline: the CSP allows only 'self'
    assert " style=" not in page


@pytest.mark.parametrize(
    ("name", "ctype"),
    [("console.js", "text/javascript; charset=utf-8"), ("console.css", "text/css; charset=utf-8")],
)
async def test_console_assets(server: OpsServer, name: str, ctype: str) -> None:
    response = await get(server.port, f"/console/{name}")
    assert response.status == 200
    assert response.headers["content-type"] == ctype
    assert len(response.body) > 1000
    assert "innerHTML" not in response.text  # broker values are rendered as text only


@pytest.mark.parametrize("path", ["/console/index.html", "/console/x.js", "/console/"])
async def test_only_the_console_assets_are_served(server: OpsServer, path: str) -> None:
    assert (await get(server.port, path)).status == 404


async def test_console_page_csp_allows_only_its_own_files(server: OpsServer) -> None:
    csp = (await get(server.port, "/")).headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "style-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe" not in csp


async def test_without_a_console_source_there_is_no_api(server: OpsServer) -> None:
    assert (await get(server.port, "/api/overview")).status == 404


async def test_head_has_headers_but_no_body(server: OpsServer) -> None:
    response = await get(server.port, "/stat", method="HEAD")
    assert response.status == 200
    assert int(response.headers["content-length"]) > 0
    assert response.body == b""


@pytest.mark.parametrize("target", ["/metrics?x=1", "http://localhost/metrics", "/metrics#f"])
async def test_request_target_forms(server: OpsServer, target: str) -> None:
    assert (await get(server.port, target)).status == 200


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/stat.json", "/.."])
async def test_unknown_path_is_404(server: OpsServer, path: str) -> None:
    response = await get(server.port, path)
    assert response.status == 404
    assert response.text == "404 Not Found\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(server: OpsServer, method: str) -> None:
    response = await get(server.port, "/metrics", method=method)
    assert response.status == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "HEAD"}


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    ],
    ids=["garbage", "no-colon", "long-target", "long-header"],
)
async def test_malformed_requests_get_a_4xx_and_the_server_goes_on(
    server: OpsServer, raw: bytes
) -> None:
    response = Response(await exchange(server.port, raw))
    assert 400 <= response.status < 500
    assert (await get(server.port, "/healthz")).status == 200


async def test_client_closing_early_does_not_break_the_server(server: OpsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    assert (await get(server.port, "/healthz")).status == 200


async def test_failing_source_gives_500_and_is_logged(
    server: OpsServer, source: FakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    source.fail = True
    with caplog.at_level(logging.ERROR, logger="kiteq.ops.http"):
        response = await get(server.port, "/stat")
    assert response.status == 500
    assert "boom" not in response.text
    assert any("path=/stat" in r.getMessage() for r in caplog.records)
    assert (await get(server.port, "/binds")).status == 200


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(
    metrics: BrokerMetrics,
) -> None:
    async with OpsServer("127.0.0.1", 0, metrics, FakeSource(), timeout=0.2) as ops:
        reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
        async with asyncio.timeout(5):
            answer = await reader.read()  # the answer, then the server's close
        assert Response(answer).status == 200
        writer.close()
        await writer.wait_closed()


async def test_stop_ends_open_connections(metrics: BrokerMetrics) -> None:
    ops = OpsServer("127.0.0.1", 0, metrics, FakeSource(), timeout=30)
    await ops.start()
    port = ops.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, stays open
    async with asyncio.timeout(5):
        await reader.readuntil(b"ok\n")
        await ops.stop()
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await ops.stop()  # idempotent


async def test_lifecycle_errors(metrics: BrokerMetrics) -> None:
    ops = OpsServer("127.0.0.1", 0, metrics, FakeSource())
    with pytest.raises(RuntimeError, match="not started"):
        _ = ops.port
    await ops.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            await ops.start()
    finally:
        await ops.stop()


async def test_port_in_use_fails_loudly(server: OpsServer, metrics: BrokerMetrics) -> None:
    other = OpsServer("127.0.0.1", server.port, metrics, FakeSource())
    with pytest.raises(OSError, match="address already in use"):
        await other.start()
    with pytest.raises(RuntimeError, match="not started"):
        _ = other.port


async def test_stop_aborts_a_client_that_does_not_read(metrics: BrokerMetrics) -> None:
    class HugeSource(FakeSource):
        def stat_snapshot(self) -> dict[str, Any]:
            return {"kiteq": {"blob": "x" * (16 * 1024 * 1024)}}

    ops = OpsServer("127.0.0.1", 0, metrics, HugeSource(), timeout=60)
    await ops.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
    writer.write(b"GET /stat HTTP/1.1\r\n\r\n")  # and never reads the 16 MiB answer
    await reader.readuntil(b"\r\n\r\n")  # the server is writing it
    async with asyncio.timeout(5):
        await ops.stop()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
