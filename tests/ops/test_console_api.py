"""The console's JSON API on the ops port, against a fake source: routing, the admin
secret, what an action must carry, and the audit line each action writes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from kiteq.core.admin import AUDIT_LOGGER
from kiteq.ops.console import (
    ConsoleConflictError,
    ConsoleInputError,
    ConsoleSource,
    Redrive,
    Resolution,
)
from kiteq.ops.http import OpsServer
from kiteq.ops.metrics import BrokerMetrics
from tests.ops.test_http import FakeSource, Response, send

SECRET = "console-s3cret"
ID = "0123456789abcdef0123456789abcdef"
Json = dict[str, Any]


class FakeConsole:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def overview(self) -> Json:
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        return {"time": 1.0, "brokers": [], "totals": {"received": 3}}

    async def groups(self) -> Json:
        return {"topics": [], "groups": []}

    async def group(self, group: str) -> Json | None:
        return {"group": group, "consumers": []} if group == "pay" else None

    async def dead_letters(
        self, where: Mapping[str, str], limit: int, after: tuple[str, str] | None
    ) -> Json:
        if where["reason"] == "bogus":
            raise ConsoleInputError("unknown dead-letter reason 'bogus'")
        self.calls.append(("dlq", (dict(where), limit, after)))
        return {"deadLetters": [], "next": None}

    async def redrive(self, request: Redrive) -> Json:
        if request.expect is not None and request.expect != 2:
            raise ConsoleConflictError(f"2 letters match now, {request.expect} were previewed")
        self.calls.append(("redrive", request))
        return {"redriven": 2, "dryRun": request.dry_run, "preview": [[ID, "pay"]]}

    async def transactions(self, *, unresolved_only: bool, limit: int, after: str) -> Json:
        self.calls.append(("tx", (unresolved_only, limit, after)))
        return {"pending": 0, "unresolved": 0, "transactions": [], "next": None}

    async def resolve(self, message_id: str, resolution: Resolution) -> Json:
        self.calls.append(("resolve", (message_id, resolution)))
        return {"changed": True}

    async def message(self, message_id: str) -> Json | None:
        return None


async def request(
    port: int,
    method: str,
    path: str,
    *,
    body: object = None,
    content_type: str = "application/json",
    secret: str | None = SECRET,
) -> Response:
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [] if secret is None else [f"Authorization: Bearer {secret}"]
    if method == "POST":
        headers += [f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
    return await send(port, method, path, headers, payload)


@pytest.fixture
def console() -> FakeConsole:
    return FakeConsole()


@pytest.fixture
async def server(metrics: BrokerMetrics, console: FakeConsole) -> AsyncIterator[OpsServer]:
    async with OpsServer(
        "127.0.0.1", 0, metrics, FakeSource(), console=console, admin_secret=SECRET
    ) as ops:
        yield ops


def test_fake_console_satisfies_the_protocol(console: FakeConsole) -> None:
    typed: ConsoleSource = console
    assert typed is console


@pytest.mark.parametrize(
    "path",
    ["/api/overview", "/api/groups", "/api/groups/pay", "/api/dlq", "/api/transactions"],
)
async def test_reads_need_the_secret(server: OpsServer, path: str) -> None:
    assert (await request(server.port, "GET", path, secret=None)).status == 401
    assert (await request(server.port, "GET", path, secret="wrong")).status == 401
    answer = await request(server.port, "GET", path)
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json; charset=utf-8"
    assert isinstance(json.loads(answer.body), dict)


async def test_api_refusals_carry_no_basic_challenge(server: OpsServer) -> None:
    # a challenge would make the browser open its own prompt over the login form
    refused = await request(server.port, "GET", "/api/overview", secret=None)
    assert refused.status == 401
    assert "www-authenticate" not in refused.headers
    stat = await request(server.port, "GET", "/stat", secret=None)
    assert stat.headers["www-authenticate"].startswith("Basic ")


async def test_actions_need_the_secret_and_change_nothing_without_it(
    server: OpsServer, console: FakeConsole, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        redrive = await request(server.port, "POST", "/api/dlq/redrive", body={}, secret=None)
        commit = await request(
            server.port, "POST", f"/api/transactions/{ID}/commit", body={}, secret="x"
        )
    assert (redrive.status, commit.status) == (401, 401)
    assert console.calls == []
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert [line.split(" peer=")[0] for line in lines] == ["admin auth failed"] * 2


async def test_dead_letter_filters_and_paging_reach_the_source(
    server: OpsServer, console: FakeConsole
) -> None:
    path = "/api/dlq?topic=trade&group=pay&reason=expired&limit=5&after=" + ID + "&afterGroup=pay"
    assert (await request(server.port, "GET", path)).status == 200
    where = {"topic": "trade", "type": "", "group": "pay", "reason": "expired"}
    assert console.calls == [("dlq", (where, 5, (ID, "pay")))]


@pytest.mark.parametrize("path", ["/api/dlq?reason=bogus", "/api/dlq?limit=0", "/api/dlq?limit=x"])
async def test_bad_filters_are_400_with_the_reason(server: OpsServer, path: str) -> None:
    answer = await request(server.port, "GET", path)
    assert answer.status == 400
    assert "bogus" in answer.text or "limit" in answer.text


async def test_unknown_group_and_message_are_404(server: OpsServer) -> None:
    assert (await request(server.port, "GET", "/api/groups/nope")).status == 404
    assert (await request(server.port, "GET", f"/api/messages/{ID}")).status == 404


async def test_a_dry_run_reaches_the_source_and_writes_no_audit_line(
    server: OpsServer, console: FakeConsole, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"filter": {"group": "pay"}, "dryRun": True}
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        answer = await request(server.port, "POST", "/api/dlq/redrive", body=body)
    assert answer.status == 200
    assert json.loads(answer.body)["dryRun"] is True
    where = {"topic": "", "type": "", "group": "pay", "reason": ""}
    assert console.calls == [("redrive", Redrive(where, [], "", dry_run=True))]
    assert [r for r in caplog.records if r.name == AUDIT_LOGGER] == []


async def test_each_action_is_one_audit_line(
    server: OpsServer, console: FakeConsole, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        await request(server.port, "POST", "/api/dlq/redrive", body={"filter": {"topic": "t"}})
        await request(server.port, "POST", "/api/dlq/redrive", body={"ids": [ID], "group": "g"})
        await request(server.port, "POST", f"/api/transactions/{ID}/rollback", body={})
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert len(lines) == 3
    assert lines[0].startswith("admin redrive via=console peer=127.0.0.1:")
    assert lines[0].endswith("filter=topic:t,type:*,group:*,reason:* redriven=2")
    assert lines[1].endswith("ids=1 group=g redriven=2")
    assert lines[2].startswith("admin rollback via=console peer=127.0.0.1:")
    assert lines[2].endswith(f"id={ID} changed=True")
    assert console.calls[-1] == ("resolve", (ID, Resolution.ROLLBACK))


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status"),
    [
        # what a cross-site form could send: refused before anything is read
        ("/api/dlq/redrive", {}, "application/x-www-form-urlencoded", 415),
        ("/api/dlq/redrive", {}, "text/plain", 415),
        ("/api/dlq/redrive", [1], "application/json", 400),
        ("/api/dlq/redrive", {"ids": "x"}, "application/json", 400),
        ("/api/dlq/redrive", {"dryRun": "yes"}, "application/json", 400),
        ("/api/dlq/redrive", {"expect": "2"}, "application/json", 400),
        ("/api/dlq/redrive", {"expect": True}, "application/json", 400),
        (f"/api/transactions/{ID}/maybe", {}, "application/json", 404),
        (f"/api/transactions/{ID}/commit", {}, "text/plain", 415),
    ],
)
async def test_malformed_actions_are_refused(
    server: OpsServer,
    console: FakeConsole,
    path: str,
    body: object,
    content_type: str,
    status: int,
) -> None:
    answer = await request(server.port, "POST", path, body=body, content_type=content_type)
    assert answer.status == status
    assert console.calls == []


async def test_a_confirmation_whose_preview_is_stale_is_409_and_not_audited(
    server: OpsServer, console: FakeConsole, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"filter": {"group": "pay"}, "expect": 3}
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        stale = await request(server.port, "POST", "/api/dlq/redrive", body=body)
        current = await request(server.port, "POST", "/api/dlq/redrive", body={**body, "expect": 2})
    assert stale.status == 409
    assert "3 were previewed" in stale.text
    assert current.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert len(lines) == 1  # the confirmation that went through


async def test_reads_are_not_actions(server: OpsServer) -> None:
    assert (await request(server.port, "GET", "/api/dlq/redrive")).status == 405
    assert (await request(server.port, "POST", "/api/overview", body={})).status == 405


async def test_requests_beyond_the_cap_get_503(metrics: BrokerMetrics) -> None:
    console = FakeConsole()
    console.hold = asyncio.Event()
    ops = OpsServer("127.0.0.1", 0, metrics, FakeSource(), console=console, max_connections=1)
    async with ops:
        held = asyncio.create_task(request(ops.port, "GET", "/api/overview", secret=None))
        await console.entered.wait()
        assert (await request(ops.port, "GET", "/healthz", secret=None)).status == 503
        console.hold.set()
        assert (await held).status == 200
        assert (await request(ops.port, "GET", "/healthz", secret=None)).status == 200
