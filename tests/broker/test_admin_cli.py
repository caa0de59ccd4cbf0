"""kiteq-admin without a broker: JSON values, tables, flags refused or capped out loud."""

from __future__ import annotations

import datetime

import pytest

from kiteq.admin import cli, render
from kiteq.proto.v1 import admin_pb2, common_pb2


def test_json_keeps_numbers_as_numbers_and_times_as_iso_8601() -> None:
    stats = admin_pb2.StatsResponse(received=2**40, backlog={"trade": 7}, uptimeSeconds=1.5)
    out = render.to_json(stats)
    assert out["received"] == 2**40  # protobuf's JSON mapping would write "1099511627776"
    assert out["backlog"] == {"trade": 7}
    assert out["uptimeSeconds"] == 1.5
    assert out["groups"] == []
    letter = admin_pb2.DeadLetterInfo(
        header=common_pb2.Header(messageId="a" * 32, expiredTime=0), deadTime=1_700_000_000.25
    )
    out = render.to_json(letter)
    assert out["deadTime"] == "2023-11-14T22:13:20.250Z"
    assert datetime.datetime.fromisoformat(str(out["deadTime"])).timestamp() == 1_700_000_000.25
    header = out["header"]
    assert isinstance(header, dict)
    assert header["expiredTime"] is None  # unset
    info = render.to_json(admin_pb2.GetMessageResponse(state=admin_pb2.MESSAGE_STATE_GONE))
    assert info["state"] == "MESSAGE_STATE_GONE"


def test_table_aligns_columns_and_marks_empty_cells() -> None:
    text = render.table(["A", "LONGER"], [("x", ""), ("yyyy", 3)])
    assert text.splitlines() == ["A     LONGER", "x     -", "yyyy  3"]
    assert render.table(["A"], []) == "(none)"


def test_groups_view_joins_connections_backlog_and_dead_letters() -> None:
    stats = admin_pb2.StatsResponse(
        groups=[admin_pb2.GroupStats(groupId="acct", connections=2, inFlight=5)],
        deadLetterGroups=[
            admin_pb2.DeadLetterCount(topic="trade", groupId="audit", count=4),
            admin_pb2.DeadLetterCount(topic="trade", groupId="", count=1),
        ],
        groupBacklogs=[
            admin_pb2.GroupBacklog(topic="trade", groupId="acct", backlog=7),
            admin_pb2.GroupBacklog(topic="audit", groupId="acct", backlog=2),
            admin_pb2.GroupBacklog(topic="trade", groupId="away", backlog=9),
        ],
    )
    lines = render.groups(stats).splitlines()
    assert lines[0].split() == ["GROUP", "CONNECTIONS", "IN-FLIGHT", "BACKLOG", "DEAD-LETTERS"]
    assert [line.split() for line in lines[1:]] == [
        ["acct", "2", "5", "9", "0"],
        ["audit", "0", "0", "0", "4"],
        ["away", "0", "0", "9", "0"],
    ]


def test_backlog_view_has_a_row_per_topic_and_group() -> None:
    stats = admin_pb2.StatsResponse(
        backlog={"trade": 9},
        deadLetterGroups=[admin_pb2.DeadLetterCount(topic="trade", groupId="audit", count=4)],
        groupBacklogs=[
            admin_pb2.GroupBacklog(
                topic="trade", groupId="away", backlog=9, unacked=1, oldestAgeSeconds=61.4
            )
        ],
    )
    per_topic, per_group = render.backlog(stats).split("\n\n")
    assert [line.split() for line in per_topic.splitlines()[1:]] == [["trade", "9", "0"]]
    assert [line.split() for line in per_group.splitlines()] == [
        ["TOPIC", "GROUP", "BACKLOG", "UNACKED", "OLDEST", "DEAD-LETTERS"],
        ["trade", "audit", "0", "0", "-", "4"],
        ["trade", "away", "9", "1", "61s", "0"],
    ]


def test_unknown_reason_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dlq", "-reason", "expird"])
    assert exited.value.code == cli.Exit.USAGE
    assert "unknown dead-letter reason 'expird'; known: expired, deliver_limit, no_binding" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_below_one_is_a_usage_error(limit: str) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dlq", "-limit", limit])
    assert exited.value.code == cli.Exit.USAGE


def test_json_flag_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--json", "stats"]).json is True
    assert parser.parse_args(["stats", "--json"]).json is True
    assert parser.parse_args(["stats"]).json is False
    assert parser.parse_args(["redrive", "-all", "--dry-run"]).dry_run is True
