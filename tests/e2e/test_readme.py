"""The README's commands and example work as written."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.e2e.broker_process import REPO, BrokerProcess

README = (REPO / "README.md").read_text()


def test_readme_gives_the_two_setup_commands_and_ci_runs_the_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    assert 'pip install -e ".[server]" && kiteq -clusterName=rocksdb_dev\n' in blocks
    assert "bash scripts/test.sh\n" in blocks
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_readme_example_delivers_a_message(broker: BrokerProcess) -> None:
    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    script = example.replace("127.0.0.1:13800", broker.address)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("stored ")
    assert lines[1] == "got trade/pay-succ attempt=1: b'{\"order\": 42}'"


def test_readme_transaction_example_commits(broker: BrokerProcess) -> None:
    example = re.findall(r"```python\n(.*?)```", README, re.S)[1]
    assert "send_transactional" in example
    script = example.replace("127.0.0.1:13800", broker.address)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("COMMIT ")
