"""The README's HTTP publish API examples run as written, with curl, against a broker."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiteq.client import Binding, Consumer
from tests.e2e.broker_process import REPO, BrokerProcess, write_config
from tests.e2e.collector import Collector

pytestmark = pytest.mark.e2e

README = (REPO / "README.md").read_text()
SECTION = README[README.index("## HTTP publish API") : README.index("## Ways of consuming")]
DEFAULT_HTTP = "127.0.0.1:13802"


def documents(output: str) -> list[Any]:
    """The JSON documents curl printed one after another."""
    decoder = json.JSONDecoder()
    found = []
    position = 0
    while position < len(output):
        if output[position].isspace():
            position += 1
            continue
        document, position = decoder.raw_decode(output, position)
        found.append(document)
    return found


def test_readme_curl_examples_run_as_written(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    start, examples = re.findall(r"```sh\n(.*?)```", SECTION, re.S)
    assert start == f"kiteq -clusterName=rocksdb_dev -hport={DEFAULT_HTTP.rpartition(':')[2]}\n"
    broker = launch(write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch"), hport=0)
    # published before any consumer binds the topic: the broker holds every message, so
    # the repeated Idempotency-Key finds the first one stored (a duplicate)
    script = "set -euo pipefail\n" + examples.replace(DEFAULT_HTTP, f"127.0.0.1:{broker.hport}")
    run = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    raw, stored, duplicate, batch, scheduled, committed = documents(run.stdout)
    assert scheduled["status"] == "scheduled"  # due in 30 s: not among the deliveries below
    assert raw["status"] == "stored"
    assert (stored["status"], duplicate["status"]) == ("stored", "duplicate")
    assert stored["id"] == duplicate["id"]
    assert (batch["stored"], batch["failed"]) == (2, 0)
    assert committed["status"] == "committed"
    got = Collector()
    with Consumer(
        brokers=[broker.address],
        group_id="acct-svc",
        secret_key="s3cret",
        bindings=[Binding.direct("trade", "pay-succ")],
        handler=got,
    ):
        got.wait_count(5)
    bodies = sorted(m.body for m in got.received)
    assert bodies == sorted([b'{"order": 42}', b"\x00\x01\x02", b"a", b"b", b"paid"])
    [first] = [m for m in got.received if m.message_id == raw["id"]]
    assert first.properties == {"order": "42"}
