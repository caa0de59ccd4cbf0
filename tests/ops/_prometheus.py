"""A throwaway Prometheus server, and a broker process under load for it to scrape.

The dashboard and alert tests evaluate every query and rule against these: a real broker
(``python -m kiteq``) with producers and consumers in four groups (acking, nacking into
the dead-letter queue, flow-limited by a watermark, offline with a backlog), scraped
twice a second by the Debian ``prometheus`` binary.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from kiteq.client import Binding, Consumer, Message, Producer
from tests._servers import free_port
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.hook_server import HookServer
from tests.waiting import wait_until

ALERT_RULES: Final = Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "kiteq-alerts.yml"
TOPIC: Final = "trade"
# bounded load: the producer stops after this many batches even if nobody tells it to
_MAX_BATCHES: Final = 2000
_BATCH: Final = 20


class Prometheus:
    """A Prometheus server that scrapes one target twice a second and loads *rules*."""

    def __init__(self, binary: str, workdir: Path, target: str, rules: Path | None = None) -> None:
        self.port = free_port()
        self.target = target
        config = workdir / "prometheus.yml"
        document: dict[str, Any] = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kiteq", "static_configs": [{"targets": [target]}]}],
        }
        if rules is not None:
            document["rule_files"] = [str(rules)]
        config.write_text(json.dumps(document))  # JSON is YAML
        self._log = (workdir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply) if path.startswith("/api/") else reply.read()

    def query(self, expr: str) -> list[Any]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        result: list[Any] = reply["data"]["result"]
        return result

    def _ready(self) -> bool:
        assert self._process.poll() is None, "prometheus exited"
        try:
            self.get("/-/ready")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(self._ready, timeout, "prometheus to become ready")

    def wait_scraped(self, timeout: float = 60.0) -> None:
        """Until the target has been scraped three times (rate() needs two samples)."""
        wait_until(
            lambda: self.query('count_over_time(up{job="kiteq"}[1m]) >= 3'),
            timeout,
            "prometheus to scrape the target three times",
        )

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()


def promtool_run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``promtool *args*``: its exit code and output, for the test to judge."""
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


class _Load:
    """A producer thread publishing batches until stopped (or ``_MAX_BATCHES``)."""

    def __init__(self, address: str, http: str = "") -> None:
        self._address = address
        # the HTTP publish API's base URL: one message through it per batch
        self._http = http
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="kiteq-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with Producer(brokers=[self._address], group_id="load", secret_key="s") as producer:
            # one refused on arrival (a topic the broker does not serve), for the rejection
            # panels; its failed future is left alone
            producer.send_async(Message(topic="unserved", message_type="pay", body=b"x"))
            # one sent twice: the second is answered duplicate, for the duplicates panel
            once = Message(topic=TOPIC, message_type="pay", body=b"x", deliver_limit=2)
            producer.send_async(once).result(30)
            producer.send_async(once).result(30)
            for _ in range(_MAX_BATCHES):
                if self._stop.is_set():
                    return
                futures = [
                    producer.send_async(
                        Message(topic=TOPIC, message_type="pay", body=b"x" * 100, deliver_limit=2)
                    )
                    for _ in range(_BATCH)
                ]
                for future in futures:
                    future.result(30)
                self.sent += len(futures)
                if self._http:
                    self._publish_http()
                self._stop.wait(0.05)

    def _publish_http(self) -> None:
        request = urllib.request.Request(
            f"{self._http}/v1/topics/{TOPIC}/messages",
            data=b"x" * 100,
            headers={"X-KiteQ-Group": "load", "X-KiteQ-Secret": "s", "X-KiteQ-Message-Type": "pay"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.read()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _consumer(address: str, group: str, handler: Collector, watermark: int = 0) -> Consumer:
    return Consumer(
        brokers=[address],
        group_id=group,
        secret_key="s",
        bindings=[Binding.fanout(TOPIC, watermark=watermark, persistent=True)],
        handler=handler,
    )


@contextmanager
def broker_under_load(tmp_path: Path, prometheus_binary: str) -> Iterator[Prometheus]:
    """A broker with four groups under load, and a Prometheus scraping it (alert rules on).

    A webhook group too (the endpoint answers 200), so that the webhook panels have data.
    """
    with HookServer() as hooks, _loaded(tmp_path, prometheus_binary, hooks) as prometheus:
        yield prometheus


@contextmanager
def _loaded(tmp_path: Path, prometheus_binary: str, hooks: HookServer) -> Iterator[Prometheus]:
    pport, hport = free_port(), free_port()
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        extra={"topics": [TOPIC], "webhookAllow": ["http://127.0.0.1:*/hooks"]},
        secrets={"hook": "hook-secret"},
    )
    with config.open("a") as fh:
        fh.write(
            f'[[clusters.e2e.webhooks]]\ngroup = "hook"\nurl = "{hooks.url()}"\n'
            f'topic = "{TOPIC}"\nbindType = "fanout"\n'
        )
    broker = BrokerProcess(config, pport=pport, args=[f"-hport={hport}"])
    broker.start()
    prometheus: Prometheus | None = None
    load = _Load(broker.address, f"http://127.0.0.1:{hport}")
    try:
        # "offline" declares its persistent binding and goes: its messages stay stored
        with _consumer(broker.address, "offline", Collector()):
            pass
        with (
            _consumer(broker.address, "ok", Collector()),
            _consumer(broker.address, "failing", Collector(lambda _: False)),
            _consumer(broker.address, "slow", Collector(), watermark=20),
        ):
            load.start()
            prometheus = Prometheus(
                prometheus_binary, tmp_path, f"127.0.0.1:{pport}", rules=ALERT_RULES
            )
            prometheus.wait_ready()
            prometheus.wait_scraped()
            yield prometheus
    finally:
        load.stop()
        if prometheus is not None:
            prometheus.stop()
        broker.stop_quietly()
