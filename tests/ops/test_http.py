from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiteq.ops.http import MAX_HEADERS, MAX_LINE_BYTES, OpsServer, StatsSource
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
        assert version == "HTTP/1.1"
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


async def get(port: int, path: str, method: str = "GET") -> Response:
    raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode()
    return Response(await exchange(port, raw))


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
async def server(touched_metrics: BrokerMetrics, source: FakeSource) -> AsyncIterator[OpsServer]:
    ops = OpsServer("127.0.0.1", 0, touched_metrics, source, timeout=2.0)
    await ops.start()
    try:
        yield ops
    finally:
        await ops.stop()


def test_fake_source_satisfies_the_protocol(source: FakeSource) -> None:
    typed: StatsSource = source
    assert typed.binds_snapshot() == BINDS


async def test_metrics(server: OpsServer) -> None:
    response = await get(server.port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(response.headers["content-length"]) == len(response.body)
    assert response.headers["connection"] == "close"
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


async def test_ops_page_is_self_contained(server: OpsServer) -> None:
    response = await get(server.port, "/")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    assert page.startswith("<!DOCTYPE html>")
    assert 'fetch(name, {cache: "no-store"})' in page
    assert '["stat", "binds"]' in page
    assert "setInterval(refresh, 3000)" in page
    # No external assets: no remote URLs, no src/href to anything but our own endpoints.
    assert "http://" not in page
    assert "https://" not in page
    assert "src=" not in page
    assert set(re.findall(r'href="([^"]*)"', page)) == {"metrics", "stat", "binds"}
    assert "innerHTML" not in page  # topic names are rendered as text only


async def test_ops_page_csp_allows_exactly_its_inline_script_and_style(server: OpsServer) -> None:
    response = await get(server.port, "/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    for tag in ("script", "style"):
        match = re.search(rf"<{tag}>(.*?)</{tag}>", response.text, re.DOTALL)
        assert match is not None
        digest = base64.b64encode(hashlib.sha256(match.group(1).encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp


async def test_head_has_headers_but_no_body(server: OpsServer) -> None:
    response = await get(server.port, "/stat", method="HEAD")
    assert response.status == 200
    assert int(response.headers["content-length"]) > 0
    assert response.body == b""


@pytest.mark.parametrize("target", ["/metrics?x=1", "http://localhost/metrics", "/metrics#f"])
async def test_request_target_forms(server: OpsServer, target: str) -> None:
    assert (await get(server.port, target)).status == 200


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/stat.json", "//metrics", "/.."])
async def test_unknown_path_is_404(server: OpsServer, path: str) -> None:
    response = await get(server.port, path)
    assert response.status == 404
    assert response.text == "404 Not Found\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "get"])
async def test_other_methods_are_405(server: OpsServer, method: str) -> None:
    response = await get(server.port, "/metrics", method=method)
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics FTP/1.0\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n", 400),
        (b"GET /" + b"a" * (MAX_LINE_BYTES + 10) + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (MAX_LINE_BYTES + 10) + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-H: v\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\n" + (b"X-H: " + b"v" * 4000 + b"\r\n") * 9 + b"\r\n", 431),
    ],
    ids=lambda v: v[:24].decode("latin-1") if isinstance(v, bytes) else str(v),
)
async def test_bad_requests(server: OpsServer, raw: bytes, status: int) -> None:
    response = Response(await exchange(server.port, raw))
    assert response.status == status
    assert response.text.startswith(str(status))


async def test_bare_newlines_are_accepted(server: OpsServer) -> None:
    response = Response(await exchange(server.port, b"GET /healthz HTTP/1.0\nHost: x\n\n"))
    assert response.status == 200


async def test_client_closing_early_does_not_break_the_server(server: OpsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")
    writer.write_eof()
    async with asyncio.timeout(1):
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


async def test_idle_connection_is_closed_after_the_timeout(metrics: BrokerMetrics) -> None:
    async with OpsServer("127.0.0.1", 0, metrics, FakeSource(), timeout=0.2) as ops:
        reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never finishes the request
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()


async def test_connections_beyond_the_cap_get_503(metrics: BrokerMetrics) -> None:
    async with OpsServer("127.0.0.1", 0, metrics, FakeSource(), max_connections=1) as ops:
        reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
        await asyncio.sleep(0.05)  # let the server accept the idle connection
        response = Response(await exchange(ops.port, b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert response.status == 503
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert Response(await reader.read()).status == 200
        writer.close()
        await writer.wait_closed()


async def test_stop_ends_open_connections(metrics: BrokerMetrics) -> None:
    ops = OpsServer("127.0.0.1", 0, metrics, FakeSource(), timeout=30)
    await ops.start()
    port = ops.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
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


async def test_stop_aborts_a_client_that_does_not_read(metrics: BrokerMetrics) -> None:
    class HugeSource(FakeSource):
        def stat_snapshot(self) -> dict[str, Any]:
            return {"kiteq": {"blob": "x" * (16 * 1024 * 1024)}}

    ops = OpsServer("127.0.0.1", 0, metrics, HugeSource(), timeout=60)
    await ops.start()
    _, writer = await asyncio.open_connection("127.0.0.1", ops.port)
    writer.write(b"GET /stat HTTP/1.1\r\n\r\n")  # and never reads the 16 MiB answer
    await asyncio.sleep(0.2)
    async with asyncio.timeout(5):
        await ops.stop()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
