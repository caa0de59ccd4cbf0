from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kiteq.core.acl import AclMode, Grant, Permissions
from kiteq.core.config import CLUSTER_DEFAULTS, ClusterConfig, load_cluster
from kiteq.core.errors import ConfigError
from kiteq.core.webhook import WebhookPolicy

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str, cluster: str = "c") -> ClusterConfig:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return load_cluster(path, cluster)


def load_error(tmp_path: Path, text: str, cluster: str = "c") -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, cluster)
    return str(info.value)


# key -> (ClusterConfig attribute, value when the key is absent)
DEFAULTS: dict[str, tuple[str, Any]] = {
    "env": ("env", ""),
    "topics": ("topics", ("*",)),
    "db": ("db", "rocksdb://./db/c?fsync=batch"),
    "deliverySeconds": ("delivery_seconds", 5.0),
    "maxDeliverWorkers": ("max_deliver_workers", 8000),
    "maxFlights": ("max_flights", 200000),
    "recoverSeconds": ("recover_seconds", 10.0),
    "noBindingRetentionSeconds": ("no_binding_retention_seconds", 3600.0),
    "historyMessages": ("history_messages", 100000),
    "historyRetentionSeconds": ("history_retention_seconds", 259200.0),
    "dedupWindowSeconds": ("dedup_window_seconds", 120.0),
    "txCheckDelaySeconds": ("tx_check_delay_seconds", 6.0),
    "txCheckIntervalSeconds": ("tx_check_interval_seconds", 30.0),
    "txCheckMax": ("tx_check_max", 15),
    "recievePermitsPerSecond": ("recieve_permits_per_second", 100000),
    "dlqExecHour": ("ignored", ()),
    "deliveryFirst": ("delivery_first", False),
    "acceptAnySecret": ("accept_any_secret", False),
    "secrets": ("secrets", {}),
    "adminSecret": ("admin_secret", ""),
    "adminSecretFile": ("admin_secret", ""),
    "adminOpen": ("admin_open", False),
    "tlsCert": ("tls_cert", ""),
    "tlsKey": ("tls_key", ""),
    "tlsClientCa": ("tls_client_ca", ""),
    "takeover": ("takeover", True),
    "takeoverGraceSeconds": ("takeover_grace_seconds", 30.0),
    "acl": ("acl", Permissions()),
    "maxBindingsPerGroupTopic": ("max_bindings_per_group_topic", 1000),
    "maxPatternLength": ("max_pattern_length", 256),
    "hport": ("hport", 0),
    "webhookAllow": ("webhook_policy", WebhookPolicy()),
    "webhooks": ("webhooks", ()),
}


def test_every_key_has_a_tested_default_and_documentation() -> None:
    assert set(DEFAULTS) == set(CLUSTER_DEFAULTS)
    for key, (_, doc) in CLUSTER_DEFAULTS.items():
        assert doc.strip(), key


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_default_of_absent_key(tmp_path: Path, key: str) -> None:
    config = load(tmp_path, "[clusters.c]\n")
    attribute, expected = DEFAULTS[key]
    assert getattr(config, attribute) == expected


def test_empty_env_means_embedded_registry(tmp_path: Path) -> None:
    config = load(tmp_path, "[clusters.c]\n")
    assert config.name == "c"
    assert config.registry == "embedded://"
    assert config.any_topic


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[registry.dev]
hosts = "zk://h1:2181,h2:2181/kq"

[clusters.c]
env = "dev"
topics = ["trade", "user-profile"]
db = "memory://?maxcap=10"
deliverySeconds = 2.5
maxDeliverWorkers = 10
recoverSeconds = 60
recievePermitsPerSecond = 8000
dlqExecHour = 0
deliveryFirst = true
acceptAnySecret = true
adminSecret = "root"

[clusters.c.secrets]
pay-svc = "s3cret"
""",
    )
    assert config.env == "dev"
    assert config.registry == "zk://h1:2181,h2:2181/kq"
    assert config.topics == ("trade", "user-profile")
    assert config.db == "memory://?maxcap=10"
    assert config.delivery_seconds == 2.5
    assert config.max_deliver_workers == 10
    assert config.recover_seconds == 60.0
    assert config.recieve_permits_per_second == 8000
    assert config.ignored == ("dlqExecHour",)
    assert config.delivery_first is True
    assert config.accept_any_secret is True
    assert config.admin_secret == "root"
    assert dict(config.secrets) == {"pay-svc": "s3cret"}
    assert not config.any_topic
    assert config.serves("trade")
    assert not config.serves("other")


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load(tmp_path, '[clusters.c]\n[clusters.c.secrets]\ng = "s"\n')
    with pytest.raises(AttributeError):
        config.db = "memory://"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.secrets["g"] = "other"  # type: ignore[index]


def test_wildcard_serves_any_topic(tmp_path: Path) -> None:
    config = load(tmp_path, '[clusters.c]\ntopics = ["*"]\n')
    assert config.serves("anything")


def test_unknown_cluster_lists_known_ones(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[clusters.beta]\n[clusters.alpha]\n", cluster="gamma")
    assert "unknown cluster 'gamma'" in message
    assert "known clusters: alpha, beta" in message


def test_unknown_cluster_without_any_clusters(tmp_path: Path) -> None:
    assert "known clusters: none" in load_error(tmp_path, "", cluster="c")


def test_unknown_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[clusters.c]\ndeliverSeconds = 5\n")
    assert message.startswith("clusters.c.deliverSeconds: unknown key")
    assert "deliverySeconds" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("deliverySeconds = -1", "clusters.c.deliverySeconds: must be > 0"),
        ("deliverySeconds = 0", "clusters.c.deliverySeconds: must be > 0"),
        ('deliverySeconds = "5"', "clusters.c.deliverySeconds: expected a number"),
        ("deliverySeconds = true", "clusters.c.deliverySeconds: expected a number"),
        ("maxDeliverWorkers = 0", "clusters.c.maxDeliverWorkers: must be a positive integer"),
        ("historyMessages = 0", "clusters.c.historyMessages: must be a positive integer"),
        ("maxDeliverWorkers = 1.5", "clusters.c.maxDeliverWorkers: expected an integer"),
        ("recoverSeconds = -3", "clusters.c.recoverSeconds: must be > 0"),
        ("recievePermitsPerSecond = 0", "clusters.c.recievePermitsPerSecond: must be a positive"),
        ("dlqExecHour = 24", "clusters.c.dlqExecHour: must be 0..23"),
        ("dlqExecHour = -1", "clusters.c.dlqExecHour: must be 0..23"),
        ('dlqExecHour = "2"', "clusters.c.dlqExecHour: expected an integer"),
        ('deliveryFirst = "yes"', "clusters.c.deliveryFirst: expected true or false"),
        ("deliveryFirst = 1", "clusters.c.deliveryFirst: expected true or false"),
        ('acceptAnySecret = "true"', "clusters.c.acceptAnySecret: expected true or false"),
        ('topics = ["a/b"]', "clusters.c.topics: invalid topic 'a/b'"),
        ('topics = [".."]', "clusters.c.topics: invalid topic '..'"),
        ("topics = [1]", "clusters.c.topics: invalid topic 1"),
        ("topics = []", "clusters.c.topics: empty"),
        ('topics = "trade"', "clusters.c.topics: expected an array"),
        ('db = "nourl"', "clusters.c.db: expected a store URL"),
        ("db = 3", "clusters.c.db: expected a string"),
        ("env = 3", "clusters.c.env: expected a string"),
        ('env = "nope"', "clusters.c.env: no [registry.nope]"),
        ("adminSecret = 1", "clusters.c.adminSecret: expected a string"),
        ('secrets = "x"', "clusters.c.secrets: expected a table"),
        ('secrets = {"a/b" = "x"}', "clusters.c.secrets.a/b"),
        ('secrets = {g = ""}', "clusters.c.secrets.g: expected a non-empty string"),
        ("secrets = {g = 1}", "clusters.c.secrets.g: expected a non-empty string"),
        ('acl = "x"', "clusters.c.acl: expected a table of groups"),
        ('acl = {"a/b" = {}}', "clusters.c.acl.a/b: invalid group name"),
        ("acl = {g = 1}", "clusters.c.acl.g: expected a table"),
        ("acl = {g = {read = []}}", "clusters.c.acl.g.read: unknown key"),
        ('acl = {g = {publish = "trade"}}', "clusters.c.acl.g.publish: expected an array"),
        ('acl = {g = {subscribe = ["pay.*"]}}', "prefix patterns are not supported"),
        ("maxBindingsPerGroupTopic = 0", "clusters.c.maxBindingsPerGroupTopic: must be a positive"),
        ("maxPatternLength = 257", "clusters.c.maxPatternLength: must be 1..256"),
        ("maxPatternLength = 0", "clusters.c.maxPatternLength: must be 1..256"),
        ("dedupWindowSeconds = -1", "clusters.c.dedupWindowSeconds: must be >= 0"),
        ("dedupWindowSeconds = 604801", "clusters.c.dedupWindowSeconds: must be at most 604800"),
        ('dedupWindowSeconds = "2m"', "clusters.c.dedupWindowSeconds: expected a number"),
    ],
)
def test_bad_value_is_named(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in load_error(tmp_path, f"[clusters.c]\n{line}\n")


def test_registry_without_hosts_string(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[registry.dev]\nhosts = 1\n[clusters.c]\nenv = "dev"\n')
    assert "clusters.c.env: no [registry.dev] with a hosts string" in message


def test_registry_scheme_is_checked(tmp_path: Path) -> None:
    message = load_error(
        tmp_path, '[registry.dev]\nhosts = "http://x"\n[clusters.c]\nenv = "dev"\n'
    )
    assert message.startswith("registry.dev.hosts: unsupported scheme")


@pytest.mark.parametrize(
    ("hosts", "registry"),
    [
        ("zk://127.0.0.1:2181", "zk://127.0.0.1:2181"),
        ("file://conf/registry_demo.toml", "file://conf/registry_demo.toml"),
        ("embedded://", "embedded://"),
        ("  ", "embedded://"),
    ],
)
def test_registry_hosts(tmp_path: Path, hosts: str, registry: str) -> None:
    config = load(tmp_path, f'[registry.e]\nhosts = "{hosts}"\n[clusters.c]\nenv = "e"\n')
    assert config.registry == registry


def test_cluster_must_be_a_table(tmp_path: Path) -> None:
    assert "clusters.c must be a table" in load_error(tmp_path, "[clusters]\nc = 1\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_cluster(tmp_path / "absent.toml", "c")


def test_invalid_toml(tmp_path: Path) -> None:
    assert "invalid TOML" in load_error(tmp_path, "[clusters.c\n")


def test_plain_secret(tmp_path: Path) -> None:
    config = load(tmp_path, '[clusters.c.secrets]\npay = "s3cret"\n')
    assert config.check_secret("pay", "s3cret")
    assert not config.check_secret("pay", "wrong")
    assert not config.check_secret("pay", "")
    assert not config.check_secret("other", "s3cret")


@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_sha256_secret(tmp_path: Path, case: Any) -> None:
    digest = case(hashlib.sha256(b"s3cret").hexdigest())
    config = load(tmp_path, f'[clusters.c.secrets]\npay = "sha256:{digest}"\n')
    assert config.check_secret("pay", "s3cret")
    assert not config.check_secret("pay", "wrong")
    assert not config.check_secret("pay", f"sha256:{digest}")


def test_accept_any_secret_covers_only_unlisted_groups(tmp_path: Path) -> None:
    config = load(
        tmp_path, '[clusters.c]\nacceptAnySecret = true\n[clusters.c.secrets]\npay = "s"\n'
    )
    assert config.check_secret("anyone", "")
    assert config.check_secret("anyone", "whatever")
    assert config.check_secret("pay", "s")
    assert not config.check_secret("pay", "wrong")


def test_unlisted_group_is_refused_by_default(tmp_path: Path) -> None:
    config = load(tmp_path, "[clusters.c]\n")
    assert not config.check_secret("anyone", "")


def shipped_clusters() -> list[str]:
    with (REPO / "conf" / "cluster.toml").open("rb") as fh:
        return sorted(tomllib.load(fh)["clusters"])


@pytest.mark.parametrize("cluster", shipped_clusters())
def test_shipped_config_loads(cluster: str) -> None:
    config = load_cluster(REPO / "conf" / "cluster.toml", cluster)
    assert config.name == cluster
    assert re.fullmatch(r"[a-z]+://.*", config.db)


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key, (default, _) in CLUSTER_DEFAULTS.items():
        assert f"| `{key}` |" in readme, key
        if isinstance(default, bool):
            assert f"| `{key}` | `{str(default).lower()}` |" in readme, key
        elif isinstance(default, int):
            assert f"| `{key}` | `{default}` |" in readme, key


def test_ignored_kiteq_key_is_validated_and_listed(tmp_path: Path) -> None:
    assert load(tmp_path, "[clusters.c]\n").ignored == ()
    assert load(tmp_path, "[clusters.c]\ndlqExecHour = 3\n").ignored == ("dlqExecHour",)


def test_acl_and_binding_limits_are_read(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[clusters.c]
maxBindingsPerGroupTopic = 10
maxPatternLength = 64

[clusters.c.acl.pay-svc]
publish = ["trade"]

[clusters.c.acl.acct-svc]
publish = []
subscribe = ["*"]
""",
    )
    assert config.max_bindings_per_group_topic == 10
    assert config.max_pattern_length == 64
    assert config.acl.mode is AclMode.ENFORCED
    assert dict(config.acl.grants) == {
        "pay-svc": Grant(publish=frozenset({"trade"})),
        "acct-svc": Grant(subscribe=frozenset({"*"})),
    }


def test_admin_secret_file_is_read_and_exclusive(tmp_path: Path) -> None:
    secret = tmp_path / "admin.secret"
    secret.write_text("  from-a-file \nignored second line\n")
    config = load(tmp_path, f'[clusters.c]\nadminSecretFile = "{secret}"\n')
    assert config.admin_secret == "from-a-file"
    both = load_error(tmp_path, f'[clusters.c]\nadminSecret = "x"\nadminSecretFile = "{secret}"\n')
    assert "clusters.c.adminSecretFile" in both
    missing = load_error(tmp_path, f'[clusters.c]\nadminSecretFile = "{tmp_path / "nope"}"\n')
    assert "clusters.c.adminSecretFile" in missing
    secret.write_text("\n")
    empty = load_error(tmp_path, f'[clusters.c]\nadminSecretFile = "{secret}"\n')
    assert "holds no secret" in empty


@pytest.mark.parametrize(
    ("cluster", "dev"),
    [("rocksdb_dev", True), ("memory_dev", True), ("file_dev", True), ("zk_online", False)],
)
def test_shipped_dev_clusters(cluster: str, dev: bool) -> None:
    assert load_cluster(REPO / "conf" / "cluster.toml", cluster).dev is dev


def test_a_cluster_accepting_any_secret_is_dev(tmp_path: Path) -> None:
    assert load(tmp_path, "[clusters.c]\nacceptAnySecret = true\n").dev
    assert not load(tmp_path, "[clusters.c]\n").dev
    assert load(tmp_path, "[clusters.c_dev]\n", "c_dev").dev
