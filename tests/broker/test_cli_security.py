"""Where the broker's and kiteq-admin's secrets and TLS settings come from (precedence)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiteq.admin import cli as admin_cli
from kiteq.broker import cli
from kiteq.broker.server import check_admin_protection
from kiteq.core.config import ClusterConfig, load_cluster
from kiteq.core.errors import ConfigError


def config(tmp_path: Path, body: str = "", name: str = "c") -> ClusterConfig:
    path = tmp_path / "cluster.toml"
    path.write_text(f"[clusters.{name}]\n{body}")
    return load_cluster(path, name)


def test_flag_file_beats_environment_beats_config(tmp_path: Path) -> None:
    base = config(tmp_path, 'adminSecret = "from-config"\ntlsCert = "c.pem"\ntlsKey = "k.pem"\n')
    options = cli.build_parser().parse_args([])
    assert cli.apply_overrides(base, options, {}).admin_secret == "from-config"
    env = {"KITEQ_ADMIN_SECRET": " from-env \n"}
    assert cli.apply_overrides(base, options, env).admin_secret == "from-env"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-flag\n")
    flagged = cli.build_parser().parse_args(
        [f"-adminSecretFile={secret_file}", "-tlsCert=other.pem", "--tlsClientCa=ca.pem"]
    )
    result = cli.apply_overrides(base, flagged, env)
    assert result.admin_secret == "from-flag"
    assert (result.tls_cert, result.tls_key, result.tls_client_ca) == (
        "other.pem",
        "k.pem",
        "ca.pem",
    )
    assert cli.apply_overrides(base, options, {"KITEQ_ADMIN_SECRET": "  "}).admin_secret == (
        "from-config"
    )


def test_admin_protection_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        check_admin_protection(config(tmp_path))
    assert "clusters.c.adminSecret" in str(raised.value)
    check_admin_protection(config(tmp_path, 'adminSecret = "x"\n'))
    check_admin_protection(config(tmp_path, "adminOpen = true\n"))
    check_admin_protection(config(tmp_path, "acceptAnySecret = true\n"))
    check_admin_protection(config(tmp_path, "", name="x_dev"))


def test_kiteq_admin_secret_sources(tmp_path: Path) -> None:
    parser = admin_cli.build_parser()
    env = {"KITEQ_ADMIN_SECRET": "from-env"}
    assert admin_cli.admin_secret(parser.parse_args(["stats"]), env) == "from-env"
    assert admin_cli.admin_secret(parser.parse_args(["stats"]), {}) == ""
    assert admin_cli.admin_secret(parser.parse_args(["-secret=flag", "stats"]), env) == "flag"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    options = parser.parse_args([f"-secretFile={secret_file}", "stats"])
    assert admin_cli.admin_secret(options, env) == "from-file"
    with pytest.raises(SystemExit):
        parser.parse_args(["-secret=a", f"-secretFile={secret_file}", "stats"])


def test_kiteq_admin_tls_flags() -> None:
    parser = admin_cli.build_parser()
    assert admin_cli.tls_options(parser.parse_args(["stats"])) is None
    system = admin_cli.tls_options(parser.parse_args(["-tls", "stats"]))
    assert system is not None
    assert system.ca is None
    full = admin_cli.tls_options(
        parser.parse_args(
            ["-tlsCa=ca.pem", "-tlsCert=c.pem", "-tlsKey=k.pem", "-tlsServerName=b1", "stats"]
        )
    )
    assert full is not None
    assert (str(full.ca), str(full.cert), str(full.key), full.server_name) == (
        "ca.pem",
        "c.pem",
        "k.pem",
        "b1",
    )
