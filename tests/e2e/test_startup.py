"""Start-up validation: a bad flag or config value is one line naming it, and exit 1."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kiteq.broker.startup import find_config, resolve_store_path, shipped_config
from kiteq.core.config import load_cluster
from tests._servers import free_port
from tests.e2e import broker_process
from tests.e2e.broker_process import REPO, write_config

pytestmark = pytest.mark.e2e

# no log line, no traceback, no shutdown lines of a broker that never ran: only this
ONE_LINE = re.compile(r"\Akiteq: [^\n]+\n\Z")


def run_kiteq(
    args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m kiteq *args*`` to its exit, in ``environment(env)`` from *cwd*."""
    return broker_process.run_kiteq(args, cwd=cwd, env=environment(env), timeout=timeout)


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without KITEQ_CONFIG, the sources on the path."""
    env = {k: v for k, v in os.environ.items() if k != "KITEQ_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(_source_roots())
    env.update(extra or {})
    return env


def _source_roots() -> list[str]:
    # run from outside the checkout: the package must come from the path, not the cwd
    return [
        str(REPO / root) for root in (".", "binding", "store", "handler", "client", "ops", "proto")
    ]


@contextlib.contextmanager
def started(args: Sequence[str], *, cwd: Path) -> Iterator[tuple[str, list[str]]]:
    """Run ``python -m kiteq *args*`` until its ready line: (ready line, lines before it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiteq", *args],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        before: list[str] = []
        ready = ""
        for line in proc.stdout:
            if line.startswith(("kiteq ready", "kiteq: ")):
                ready = line
                break
            before.append(line)
        assert ready.startswith("kiteq ready"), (ready, before)
        yield ready, before
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, db="memory://")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["-pport=70000"], "kiteq: -pport: must be 0..65535 (or < 0: off), got 70000\n"),
        (["-hport=70000"], "kiteq: -hport: must be 0..65535 (or < 0: off), got 70000\n"),
        (
            ["-pport=13999", "-hport=13999"],
            "kiteq: -hport: port 13999 is already the gRPC or ops port\n",
        ),
        (["-grace=-5"], "kiteq: -grace: must be >= 0 seconds, got -5.0\n"),
        (["-bind=127.0.0.1:70000"], "kiteq: -bind: expected host:port, got '127.0.0.1:70000'\n"),
        (["-clusterName=nope"], None),
    ],
)
def test_bad_flag_is_one_line_and_exit_1(
    config: Path, tmp_path: Path, flags: list[str], expected: str | None
) -> None:
    run = run_kiteq(["-clusterName=e2e", f"-configPath={config}", *flags], cwd=tmp_path)
    assert run.returncode == 1
    assert run.stdout == ""
    assert ONE_LINE.match(run.stderr), run.stderr
    if expected is not None:
        assert run.stderr == expected
    else:
        assert "unknown cluster 'nope'" in run.stderr


@pytest.mark.parametrize("flag", ["-bind", "-pport", "-hport"])
def test_busy_port_names_the_flag_and_the_cause(
    config: Path, tmp_path: Path, busy_port: int, flag: str
) -> None:
    ports = {"-bind": "127.0.0.1:0", "-pport": "0", "-hport": "0"}
    ports[flag] = f"127.0.0.1:{busy_port}" if flag == "-bind" else str(busy_port)
    run = run_kiteq(
        [
            "-clusterName=e2e",
            f"-configPath={config}",
            f"-bind={ports['-bind']}",
            f"-pport={ports['-pport']}",
            f"-hport={ports['-hport']}",
        ],
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert ONE_LINE.match(run.stderr), run.stderr
    assert (
        run.stderr
        == f"kiteq: {flag}: cannot listen on 127.0.0.1:{busy_port}: address already in use\n"
    )


def test_port_0_listeners_bind_ports_the_os_picks_named_in_the_ready_line(
    config: Path, tmp_path: Path
) -> None:
    args = ["-clusterName=e2e", f"-configPath={config}", "-bind=127.0.0.1:0", "-pport=0"]
    with started([*args, "-hport=0"], cwd=tmp_path) as (ready, _):
        fields = dict(re.findall(r" (\w+)=(\S+)", ready))
        with urllib.request.urlopen(f"{fields['ops']}/healthz", timeout=5) as reply:
            assert reply.status == 200
        # the HTTP publish API takes only POSTs: a GET is answered, and refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{fields['http']}/v1/topics/trade/messages", timeout=5)
        refused.value.close()
        assert (refused.value.code, refused.value.headers["Server"]) == (405, "kiteq")
    ports = {fields[name].rpartition(":")[2] for name in ("bind", "ops", "http")}
    assert len(ports) == 3, ready
    assert "0" not in ports, ready
    # both off by default (and -pport < 0): the ready line names neither
    with started([*args[:-1], "-pport=-1"], cwd=tmp_path) as (ready, _):
        assert " ops=" not in ready
        assert " http=" not in ready


def test_busy_hport_from_the_config_names_the_key(tmp_path: Path, busy_port: int) -> None:
    config = write_config(tmp_path, db="memory://", extra={"hport": busy_port})
    run = run_kiteq(
        ["-clusterName=e2e", f"-configPath={config}", "-bind=127.0.0.1:0"], cwd=tmp_path
    )
    assert run.returncode == 1
    assert run.stderr == (
        f"kiteq: clusters.e2e.hport: cannot listen on 127.0.0.1:{busy_port}: "
        "address already in use\n"
    )


def error_lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    lines = (run.stdout + run.stderr).splitlines()
    assert not any(
        "Traceback" in line or "stopping" in line or "draining" in line for line in lines
    ), lines
    return [line for line in lines if line.startswith("kiteq: ")]


def test_unreachable_store_names_the_db_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, db=f"mysql://root:x@127.0.0.1:{free_port()}/kiteq?timeout=2")
    run = run_kiteq(
        ["-clusterName=e2e", f"-configPath={config}", "-bind=127.0.0.1:0"], cwd=tmp_path
    )
    assert run.returncode == 1
    [line] = error_lines(run)
    assert line.startswith("kiteq: clusters.e2e.db: store unavailable: mysql://")
    assert "Can't connect" in line
    assert run.stderr.endswith(line + "\n")  # the last line


def test_unwritable_rocksdb_path_names_the_db_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path, db=f"rocksdb://{blocker / 'db'}")
    run = run_kiteq(
        ["-clusterName=e2e", f"-configPath={config}", "-bind=127.0.0.1:0"], cwd=tmp_path
    )
    assert run.returncode == 1
    [line] = error_lines(run)
    assert line.startswith(f"kiteq: clusters.e2e.db: store unavailable: rocksdb://{blocker / 'db'}")


def test_unreachable_zookeeper_names_the_registry_key(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        f'[registry.zk]\nhosts = "zk://127.0.0.1:{free_port()}?timeout=2"\n'
        '[clusters.e2e_dev]\nenv = "zk"\ndb = "memory://"\n'
    )
    run = run_kiteq(
        ["-clusterName=e2e_dev", f"-configPath={path}", "-bind=127.0.0.1:0"],
        cwd=tmp_path,
        timeout=90,
    )
    assert run.returncode == 1
    [line] = error_lines(run)
    assert line.startswith(
        "kiteq: registry.zk.hosts: registry unavailable: ZooKeeper zk://127.0.0.1:"
    )


def test_version(tmp_path: Path) -> None:
    run = run_kiteq(["--version"], cwd=tmp_path)
    assert run.returncode == 0
    assert re.fullmatch(r"kiteq \d+\.\d+\.\d+\S*\n", run.stdout), run.stdout


def test_runs_from_any_directory_with_the_shipped_config_and_an_absolute_store_path(
    tmp_path: Path,
) -> None:
    # no conf/ here, no -configPath, no KITEQ_CONFIG: the shipped conf/cluster.toml
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    with started(["-clusterName=rocksdb_dev", "-bind=127.0.0.1:0"], cwd=run_dir) as (ready, _):
        assert f"store=rocksdb://{run_dir / 'db' / 'rocksdb_dev'}?fsync=batch" in ready
        assert f"config={REPO / 'conf' / 'cluster.toml'}" in ready
        assert (run_dir / "db" / "rocksdb_dev").is_dir()


def test_kiteq_config_env_is_used_and_a_missing_one_named(tmp_path: Path, config: Path) -> None:
    missing = run_kiteq(
        ["-clusterName=e2e"], cwd=tmp_path, env={"KITEQ_CONFIG": str(tmp_path / "no.toml")}
    )
    assert missing.returncode == 1
    assert missing.stderr == f"kiteq: $KITEQ_CONFIG: no config file at '{tmp_path / 'no.toml'}'\n"
    wrong_cluster = run_kiteq(
        ["-clusterName=nope"], cwd=tmp_path, env={"KITEQ_CONFIG": str(config)}
    )
    assert wrong_cluster.returncode == 1
    assert f"in {config}" in wrong_cluster.stderr  # it read the file the variable names


def test_config_lookup_order(tmp_path: Path) -> None:
    given = tmp_path / "given.toml"
    from_env = tmp_path / "env.toml"
    from_env.write_text("")
    env = {"KITEQ_CONFIG": str(from_env)}
    assert find_config(str(given), env, tmp_path) == given  # the flag first, even if absent
    assert find_config(None, env, tmp_path) == from_env
    assert find_config(None, {}, tmp_path) == shipped_config()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "cluster.toml").write_text("")
    assert find_config(None, {}, tmp_path) == tmp_path / "conf" / "cluster.toml"
    assert find_config(None, env, tmp_path) == from_env
    assert shipped_config() == REPO / "conf" / "cluster.toml"  # a source checkout


@pytest.mark.parametrize(
    ("db", "expected"),
    [
        ("rocksdb://./db/x?fsync=batch", "rocksdb:///base/db/x?fsync=batch"),
        ("rocksdb://db/x", "rocksdb:///base/db/x"),
        ("rocksdb://../x", "rocksdb:///x"),
        ("rocksdb:///var/lib/kiteq?fsync=always", "rocksdb:///var/lib/kiteq?fsync=always"),
        ("memory://", "memory://"),
        ("mysql://root:@127.0.0.1:3306?db=kite", "mysql://root:@127.0.0.1:3306?db=kite"),
    ],
)
def test_relative_rocksdb_paths_are_resolved_against_the_base(db: str, expected: str) -> None:
    config = load_cluster(REPO / "conf" / "cluster.toml", "memory_dev")
    resolved = resolve_store_path(dataclasses.replace(config, db=db), Path("/base"))
    assert resolved.db == expected


def test_ignored_kiteq_key_is_warned_before_ready(tmp_path: Path) -> None:
    path = write_config(tmp_path, db="memory://", extra={"dlqExecHour": 3})
    args = ["-clusterName=e2e", f"-configPath={path}", "-bind=127.0.0.1:0"]
    with started(args, cwd=tmp_path) as (_, before_ready):
        warned = [line for line in before_ready if "dlqExecHour" in line]
        assert len(warned) == 1, before_ready
        assert "WARNING" in warned[0]
        assert "ignored" in warned[0]
