"""RejectionLog: every refusal counted, log lines bounded per peer host and interval."""

from __future__ import annotations

import logging

import pytest

from kiteq.broker.rejections import OTHER_PEERS, Rejection, RejectionLog, peer_host
from kiteq.core.clock import ManualClock
from kiteq.ops.metrics import BrokerMetrics
from kiteq.ops.metrics.labels import FRAME_REJECT_REASONS


def counted(metrics: BrokerMetrics, reason: Rejection) -> float | None:
    return metrics.registry.get_sample_value(
        "kiteq_rejected_frames_total", {"reason": reason.value}
    )


def test_every_reason_is_a_metric_label() -> None:
    assert {r.value for r in Rejection} == FRAME_REJECT_REASONS


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:51234", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:[2001:db8::1]:443", "ipv6:[2001:db8::1]"),
        ("unix:/run/kiteq.sock", "unix:/run/kiteq.sock"),
    ],
)
def test_peers_are_keyed_by_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_one_line_per_host_and_interval_with_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    metrics = BrokerMetrics(process=False)
    log = RejectionLog(clock, metrics, interval=10.0)
    with caplog.at_level(logging.WARNING, logger="kiteq.broker.rejections"):
        for port in range(1000):  # a new stream (and port) per frame
            log.note(f"ipv4:10.0.0.1:{port}", Rejection.UNDECODABLE, "garbage")
        log.note("ipv4:10.0.0.2:1", Rejection.UNEXPECTED, "x" * 10_000)
        assert log.lines == 2
        clock.advance(10.0)
        log.note("ipv4:10.0.0.1:5", Rejection.STRAY_ACK, "3 acks", 3)
    assert log.lines == 3
    assert counted(metrics, Rejection.UNDECODABLE) == 1000
    assert counted(metrics, Rejection.UNEXPECTED) == 1
    assert counted(metrics, Rejection.STRAY_ACK) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "peer=ipv4:10.0.0.1 reason=undecodable" in lines[0]
    assert "suppressed=0" in lines[0]
    assert len(lines[1]) < 400, "a peer's input is quoted shortened"
    assert "reason=stray_ack" in lines[2]
    assert "suppressed=999" in lines[2]


def test_many_hosts_share_one_entry_beyond_the_bound() -> None:
    clock = ManualClock()
    log = RejectionLog(clock, None, interval=10.0, max_peers=4)
    for i in range(100):
        log.note(f"ipv4:10.0.1.{i}:1", Rejection.UNAUTHENTICATED, "group=g")
    # four hosts of their own, then one line for all the others
    assert log.lines == 5
    assert len(log._windows) == 5
    assert OTHER_PEERS in log._windows
