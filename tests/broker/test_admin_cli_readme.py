"""The README's Admin CLI block, run line by line as written against a broker process."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kiteq.client import Binding
from tests.broker._dead_letters import dead_letter
from tests.e2e.broker_process import REPO, BrokerProcess

pytestmark = pytest.mark.e2e

README = (REPO / "README.md").read_text()
DEFAULT_BROKER = "127.0.0.1:13800"


def admin_block() -> list[str]:
    section = README[README.index("### Admin CLI") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A kiteq-admin on PATH that runs this checkout's code (the installed script may be
    older than the source)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    script = directory / "kiteq-admin"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kiteq.admin.cli "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory


def test_admin_cli_block_runs_as_written(broker: BrokerProcess, bin_dir: Path) -> None:
    binding = Binding.direct("trade", "pay-succ")
    dead_letter(broker, 2, producer="pay-svc", group="acct-svc", binding=binding)
    lines = admin_block()
    assert lines[0].startswith(f"export KITEQ_ADMIN_BROKER={DEFAULT_BROKER}")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    outputs: dict[str, str] = {}
    for line in lines[1:]:
        # the block's export, with this broker's port; then the line exactly as written
        script = f"export KITEQ_ADMIN_BROKER={broker.address}\n{line}"
        run = subprocess.run(
            ["bash", "-o", "pipefail", "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, f"{line}\n{run.stderr}"
        outputs[line.split("#")[0].strip()] = run.stdout
    assert ["acct-svc", "0", "0", "0", "2"] in [  # the consumer has left
        row.split() for row in outputs["kiteq-admin groups"].splitlines()
    ]
    listed = outputs["kiteq-admin dlq -topic trade -reason deliver_limit"].splitlines()
    assert len(listed) == 3  # header and two letters
    assert outputs["kiteq-admin redrive -topic trade -group acct-svc --dry-run"] == (
        "would redrive 2 dead letters (dry run: nothing moved)\n"
    )
    assert outputs["kiteq-admin redrive -topic trade -group acct-svc"] == (
        "redrove 2 dead letters\n"
    )
    [json_line] = [key for key in outputs if key.startswith("kiteq-admin --json stats")]
    assert outputs[json_line] == "2\n"
