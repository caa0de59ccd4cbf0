"""The README's ways of consuming (issue #17) run as written against a real broker."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.e2e.broker_process import REPO, BrokerProcess

pytestmark = pytest.mark.e2e

README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Ways of consuming") : README.index("## The broker")]
EXAMPLES = re.findall(r"```python\n(.*?)```", SECTION, re.S)


def run(example: str, broker: BrokerProcess) -> list[str]:
    script = example.replace("127.0.0.1:13800", broker.address)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_section_has_an_example_per_way_of_consuming() -> None:
    assert len(EXAMPLES) == 3
    assert "async for msg in consumer" in EXAMPLES[0]
    assert "for count, msg in enumerate(consumer, 1)" in EXAMPLES[1]
    assert "batch_handler=handle_batch" in EXAMPLES[2]


def test_iteration_example_acks_and_redelivers_the_delayed_nack(broker: BrokerProcess) -> None:
    assert run(EXAMPLES[0], broker) == ["acked b'1' attempt=1", "acked b'2' attempt=2"]


def test_sync_iteration_example_acks_from_threads(broker: BrokerProcess) -> None:
    assert run(EXAMPLES[1], broker) == ["acked 3"]


def test_pause_and_batch_example_handles_everything_after_resume(broker: BrokerProcess) -> None:
    assert run(EXAMPLES[2], broker) == ["handled 10"]
