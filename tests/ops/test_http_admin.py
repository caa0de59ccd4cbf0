"""The ops port behind the admin secret: which paths, which credentials, the audit line."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator

import pytest

from kiteq.core.admin import AUDIT_LOGGER
from kiteq.ops.http import PROTECTED_PATHS, OpsServer
from kiteq.ops.metrics import BrokerMetrics
from tests.ops.test_http import FakeSource, Response, send

SECRET = "ops-s3cret"


async def get(port: int, path: str, authorization: str | None = None) -> Response:
    headers = [] if authorization is None else [f"Authorization: {authorization}"]
    return await send(port, "GET", path, headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
async def guarded(metrics: BrokerMetrics) -> AsyncIterator[OpsServer]:
    async with OpsServer(
        "127.0.0.1", 0, metrics, FakeSource(), timeout=2.0, admin_secret=SECRET
    ) as ops:
        yield ops


def test_the_pages_that_reveal_clients_are_protected() -> None:
    # and every /api/... path (tests/ops/test_console_api.py); the console's page is
    # static and holds no data
    assert {"/stat", "/binds"} == PROTECTED_PATHS


@pytest.mark.parametrize("path", sorted(PROTECTED_PATHS))
async def test_protected_paths_need_the_secret(guarded: OpsServer, path: str) -> None:
    refused = await get(guarded.port, path)
    assert refused.status == 401
    assert refused.headers["www-authenticate"] == 'Basic realm="kiteq admin", charset="UTF-8"'
    assert b"admin secret required" in refused.body
    for wrong in (
        f"Bearer {SECRET[:-1]}",
        f"Bearer {SECRET}{SECRET}",
        basic("admin", "wrong"),
        f"Digest {SECRET}",
        "Basic not-base64!",
        SECRET,
    ):
        assert (await get(guarded.port, path, wrong)).status == 401, wrong
    for right in (f"Bearer {SECRET}", f"bearer  {SECRET}", basic("anyone", SECRET)):
        assert (await get(guarded.port, path, right)).status == 200, right


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/", "/console/console.js"])
async def test_metrics_and_health_stay_open(guarded: OpsServer, path: str) -> None:
    assert (await get(guarded.port, path)).status == 200


async def test_unknown_paths_are_not_found_without_auth(guarded: OpsServer) -> None:
    assert (await get(guarded.port, "/nope")).status == 404


async def test_each_refusal_is_one_audit_line(
    guarded: OpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await get(guarded.port, "/stat")
        await get(guarded.port, "/binds", "Bearer wrong")
        await get(guarded.port, "/stat", f"Bearer {SECRET}")
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert len(lines) == 2
    assert lines[0].startswith("admin auth failed peer=127.0.0.1:")
    assert lines[0].endswith("path=/stat reason=no secret")
    assert lines[1].endswith("path=/binds reason=wrong secret")


async def test_without_a_secret_everything_is_open(metrics: BrokerMetrics) -> None:
    async with OpsServer("127.0.0.1", 0, metrics, FakeSource(), timeout=2.0) as ops:
        for path in sorted(PROTECTED_PATHS):
            assert (await get(ops.port, path)).status == 200
