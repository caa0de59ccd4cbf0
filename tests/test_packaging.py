"""The client-only install (``pip install kiteq``, no extra): what runs and what says why not.

Each check runs in a fresh interpreter in which the server extra's modules (and, where the
code must not need it, kazoo) cannot be imported, as on a host with the bare package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiteq.broker.commands import SERVER_EXTRA_MODULES
from tests.e2e.broker_process import REPO, BrokerProcess, write_config

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def run_without(
    blocked: set[str], code: str, *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run *code* where importing any module of *blocked* fails as if not installed."""
    # None in sys.modules: "import x" raises ImportError and find_spec("x") is None,
    # as when x is not installed
    prelude = f"import sys\nfor name in {sorted(blocked)!r}:\n    sys.modules[name] = None\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


SERVER_EXTRA = set(SERVER_EXTRA_MODULES) | {"uvloop"}
BROKER_SIDE = ("kiteq.broker", "kiteq.handler", "kiteq.store", "kiteq.ops")


def test_the_server_extra_list_matches_pyproject() -> None:
    # distribution name -> the module it installs, for each requirement of the extra
    modules = {
        "grpcio-health-checking": "grpc_health",
        "grpcio-reflection": "grpc_reflection",
        "rocksdict": "rocksdict",
        "sqlalchemy": "sqlalchemy",
        "pymysql": "pymysql",
        "prometheus-client": "prometheus_client",
        "aiohttp": "aiohttp",
        "google-re2": "re2",
        "uvloop": "uvloop",
    }
    extra = PYPROJECT["project"]["optional-dependencies"]["server"]
    names = {requirement.split(">")[0].split("=")[0].split("<")[0] for requirement in extra}
    assert {modules[name] for name in names} == SERVER_EXTRA


def test_import_client_loads_neither_kazoo_nor_the_broker_side(tmp_path: Path) -> None:
    done = run_without(
        SERVER_EXTRA,
        f"""
        import kiteq.client
        from kiteq.client import Producer
        with Producer(brokers=["127.0.0.1:1"], group_id="g", secret_key="s"):
            pass
        loaded = sorted(
            m for m in sys.modules
            if m.startswith(("kazoo", *{BROKER_SIDE!r})) and sys.modules[m] is not None
        )
        print(loaded)
        """,
        cwd=tmp_path,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    config = write_config(tmp_path, db="memory://")
    process = BrokerProcess(config)
    process.start()
    yield process
    process.stop_quietly()


@pytest.mark.e2e
def test_kiteq_admin_runs_without_the_server_extra_or_kazoo(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    done = run_without(
        SERVER_EXTRA | {"kazoo"},
        f"""
        from kiteq.admin.cli import main
        code = main(sys.argv[1:])
        loaded = sorted(
            m for m in sys.modules
            if m.startswith(("kazoo", *{BROKER_SIDE!r})) and sys.modules[m] is not None
        )
        sys.stderr.write(repr(loaded) + "\\n")
        raise SystemExit(code)
        """,
        "--json",
        "-broker",
        broker.address,
        "stats",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cluster"] == "e2e"
    assert done.stderr.strip() == "[]"


@pytest.mark.parametrize(
    ("code", "command"),
    [
        ("from kiteq.broker.commands import kiteq; raise SystemExit(kiteq())", "kiteq"),
        (
            "from kiteq.broker.commands import kiteq_schema; raise SystemExit(kiteq_schema())",
            "kiteq-schema",
        ),
        ("import runpy; runpy.run_module('kiteq', run_name='__main__')", "kiteq"),
    ],
)
def test_broker_commands_name_the_extra_to_install(tmp_path: Path, code: str, command: str) -> None:
    done = run_without({"rocksdict", "sqlalchemy"}, code, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"{command}: needs the server extra (missing rocksdict, sqlalchemy): "
        'pip install "kiteq[server]"\n'
    )


def test_every_command_points_at_a_function_that_exists() -> None:
    import importlib

    scripts = PYPROJECT["project"]["scripts"]
    assert {"kiteq", "kiteq-admin", "kiteq-schema"} <= set(scripts)
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    # the broker commands go through the extra check first
    assert scripts["kiteq"] == "kiteq.broker.commands:kiteq"
    assert scripts["kiteq-schema"] == "kiteq.broker.commands:kiteq_schema"
    assert scripts["kiteq-admin"] == "kiteq.admin.cli:main"


def test_project_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["readme"] == "README.md"
    assert any(c.startswith("Development Status ::") for c in project["classifiers"])
    assert "Typing :: Typed" in project["classifiers"]
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    shipped = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert shipped == {"conf/cluster.toml": "kiteq/broker/conf/cluster.toml"}
    assert (REPO / "conf" / "cluster.toml").is_file()
