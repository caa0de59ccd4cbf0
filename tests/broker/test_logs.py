"""The broker's log: -logFormat, -logPath, summaries, session close, drain progress."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiteq.broker.logs import LOG_FILE, EventSummary, LogFormat, configure
from kiteq.client import Binding, Consumer, Message, Producer, ReceivedMessage
from kiteq.core.errors import ConfigError
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.waiting import wait_until


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _boom() -> None:
    raise ValueError("boom")


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_go_to_stderr_and_the_log_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", LogFormat.JSON, str(tmp_path / "logs"))
    logging.getLogger("kiteq.test").info("hello %s", "there")
    try:
        _boom()
    except ValueError:
        logging.getLogger("kiteq.test").exception("failed")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = (tmp_path / "logs" / LOG_FILE).read_text().splitlines()
    assert capsys.readouterr().err.splitlines() == lines
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "hello there"
    assert first["level"] == "INFO"
    assert first["logger"] == "kiteq.test"
    assert first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_root_logger")
def test_text_format_is_the_default_shape(capsys: pytest.CaptureFixture[str]) -> None:
    configure("WARNING", LogFormat.TEXT, None)
    logging.getLogger("kiteq.test").info("quiet")
    logging.getLogger("kiteq.test").warning("loud")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING kiteq.test loud")


def test_an_unwritable_log_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="-logPath"):
        configure("INFO", LogFormat.TEXT, str(blocker / "logs"))


def test_summary_names_the_top_keys_and_sums_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("kiteq.test.summary")
    summary = EventSummary(logger, "dead letters", "topic/group/reason")
    assert summary.flush(10) == 0
    assert caplog.records == []
    summary.add({f"t/g{i}/expired": i + 1 for i in range(12)})
    summary.add({"t/g11/expired": 100})
    with caplog.at_level(logging.INFO, logger.name):
        assert summary.flush(10) == 178
        assert summary.flush(10) == 0
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("dead letters summary last=10s total=178 by topic/group/reason: ")
    assert "t/g11/expired=112 " in message
    assert message.endswith(" others=3")  # g0 (1) and g1 (2) are not named


# --- a broker process -------------------------------------------------------------------


def _lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for_line(
    path: Path, predicate: Callable[[str], bool], what: str, timeout: float = 60
) -> None:
    wait_until(
        lambda: path.exists() and any(predicate(line["msg"]) for line in _lines(path)),
        timeout,
        f"the log line: {what}",
    )


@contextlib.contextmanager
def _consumer_and_producer(
    address: str, group: str, handler: Callable[[ReceivedMessage], bool]
) -> Iterator[Producer]:
    """*group* consuming every ``trade`` message with *handler*, and a producer to send them."""
    with (
        Consumer(
            brokers=[address],
            group_id=group,
            secret_key="s",
            bindings=[Binding.fanout("trade", persistent=True)],
            handler=handler,
        ),
        Producer(brokers=[address], group_id="pay", secret_key="s") as producer,
    ):
        yield producer


def test_broker_logs_json_summaries_session_close_and_drain(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    broker = BrokerProcess(
        write_config(tmp_path, db="memory://"),
        args=["-logFormat=json", f"-logPath={logs}"],
    )
    log = logs / LOG_FILE
    broker.start()
    try:
        failing = Collector(lambda _: False)
        with _consumer_and_producer(broker.address, "failing", failing) as producer:
            for _ in range(30):
                producer.send(
                    Message(topic="trade", message_type="pay", body=b"x", deliver_limit=1)
                )
            failing.wait_count(30, timeout=60)
            # thirty dead letters make one summary line, not thirty lines
            _wait_for_line(
                log,
                lambda m: (
                    m.startswith("dead letters summary") and "trade/failing/deliver_limit=" in m
                ),
                "dead letter summary",
            )
        _wait_for_line(
            log,
            lambda m: m.startswith("session closed") and "group=failing" in m,
            "session closed",
        )
        closed = [m["msg"] for m in _lines(log) if m["msg"].startswith("session closed")]
        assert any("reason=client_closed" in m and "duration_s=" in m for m in closed), closed
        summaries = [m["msg"] for m in _lines(log) if m["msg"].startswith("dead letters summary")]
        total = sum(int(m.split("total=")[1].split()[0]) for m in summaries)
        assert total == 30
        assert not [m for m in _lines(log) if m["msg"].startswith("dead letter id=")]

        # a delivery held unacked at shutdown: the drain says what it waits for
        release = threading.Event()
        held = threading.Event()

        def hold(_: ReceivedMessage) -> bool:
            held.set()
            release.wait(30)
            return True

        with _consumer_and_producer(broker.address, "slow", hold) as producer:
            producer.send(Message(topic="trade", message_type="pay", body=b"x"))
            assert held.wait(30)
            try:
                assert broker.terminate() == 0
            finally:
                release.set()
    finally:
        broker.stop_quietly()
    messages = [m["msg"] for m in _lines(log)]
    assert any(m.startswith("draining: waiting for 1 deliveries, 0 publishes") for m in messages)
    assert messages[-1] == "stopped"
    # stdout (the ready line) and stderr carried the same JSON lines
    assert any(line.startswith("{") for line in broker.output)
