"""Broker configuration: KiteQ's ``conf/cluster.toml`` keys, validated, with defaults.

Layout (KiteQ's, plus a few keys of ours)::

    [registry.<env>]
    hosts = "embedded://" | "file://conf/registry_demo.toml" | "zk://h1:2181,h2:2181[/chroot]"

    [clusters.<name>]
    env = "<env>"                  # which [registry.<env>] to use
    topics = ["trade"]             # or ["*"] / absent: any valid topic
    db = "rocksdb://./db/x?fsync=batch"
    ...

Every key has a default (``CLUSTER_DEFAULTS``); an unknown key or a bad value raises
``ConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
import hmac
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from kiteq.core.acl import Permissions, parse_acl
from kiteq.core.errors import ConfigError
from kiteq.core.limits import is_name
from kiteq.core.params import Params
from kiteq.core.webhook import WebhookPolicy
from kiteq.core.webhook_config import ConfiguredWebhook, parse_allow, parse_webhooks

__all__ = ["CLUSTER_DEFAULTS", "ClusterConfig", "load_cluster", "read_secret_file"]

ANY_TOPIC: Final = "*"
# KiteQ keys accepted for compatibility that change nothing here
IGNORED_KEYS: Final = ("dlqExecHour",)
EMBEDDED_REGISTRY: Final = "embedded://"
DEFAULT_MAX_BINDINGS_PER_GROUP_TOPIC: Final = 1000
# the idempotency window: NATS JetStream's duplicate window by default; at most the
# longest expiry a message can have (7 days)
DEFAULT_DEDUP_WINDOW_SECONDS: Final = 120
MAX_DEDUP_WINDOW_SECONDS: Final = 7 * 86400
# the wire format's own bound on a regex binding (kiteq.binding.model.MAX_PATTERN_CHARS)
MAX_PATTERN_LENGTH: Final = 256
MAX_PORT: Final = 65535

# key: (default, documentation). The README's table lists the same keys and defaults
# (tests/core/test_config.py checks that they agree).
CLUSTER_DEFAULTS: Final[Mapping[str, tuple[Any, str]]] = MappingProxyType(
    {
        "env": ("", "registry environment: picks [registry.<env>]; empty = embedded registry"),
        "topics": (["*"], 'topics served; ["*"] or absent = any valid topic'),
        "db": ("", "store URL; empty = rocksdb://./db/<clusterName>?fsync=batch"),
        "deliverySeconds": (5, "seconds to wait for a consumer's ack before retrying"),
        "maxDeliverWorkers": (8000, "deliveries in flight at once, broker-wide"),
        "maxFlights": (
            200000,
            "messages held in memory for delivery at once; more wait in the store",
        ),
        "recoverSeconds": (10, "period of the scan that redelivers due messages"),
        "noBindingRetentionSeconds": (
            3600,
            "how long a message that matches no binding is kept before the dead-letter queue",
        ),
        "historyMessages": (
            100000,
            "messages whose history the broker keeps in memory (~300 B each); a message "
            "off the happy path also has its history in the store",
        ),
        "historyRetentionSeconds": (
            259200,
            "how long a message's stored history is kept (default 3 days)",
        ),
        "dedupWindowSeconds": (
            DEFAULT_DEDUP_WINDOW_SECONDS,
            "how long a delivered message's id is remembered after its delete, so a "
            f"re-publish of it is a duplicate (0 = off; at most {MAX_DEDUP_WINDOW_SECONDS})",
        ),
        "txCheckDelaySeconds": (
            6,
            "first check of an undecided transactional message, after publish",
        ),
        "txCheckIntervalSeconds": (30, "period of the following checks"),
        "txCheckMax": (15, "checks before an undecided message is parked as unresolved"),
        "recievePermitsPerSecond": (100000, "broker-wide publish rate (KiteQ's spelling)"),
        "dlqExecHour": (
            2,
            "KiteQ's daily dead-letter sweep hour (0-23): accepted and ignored, with a warning "
            "at start-up; messages move to the dead-letter queue as soon as they are found",
        ),
        "deliveryFirst": (False, "push before storing; store only on failure"),
        "acceptAnySecret": (False, "accept any group secret (development clusters only)"),
        "secrets": ({}, 'per-group secrets: {group = "secret"} (or "sha256:<hex>")'),
        "adminSecret": (
            "",
            "secret of the admin service and of the ops pages /stat /binds / "
            "(KITEQ_ADMIN_SECRET overrides it); required unless dev cluster or adminOpen",
        ),
        "adminSecretFile": (
            "",
            "file whose first line is the admin secret (instead of adminSecret); "
            "-adminSecretFile overrides it",
        ),
        "adminOpen": (
            False,
            "let a production-shaped cluster run with no admin secret (admin service open)",
        ),
        "tlsCert": (
            "",
            "PEM certificate chain of the gRPC port; with tlsKey: TLS on; empty = plaintext",
        ),
        "tlsKey": ("", "PEM private key of tlsCert"),
        "tlsClientCa": (
            "",
            "PEM CA bundle: clients must present a certificate it signed (mTLS); empty = no check",
        ),
        "takeover": (
            True,
            "with a zk:// registry and a shared MySQL store, take over the backlog of dead brokers",
        ),
        "takeoverGraceSeconds": (
            30,
            "seconds a broker's ZooKeeper alive node must be gone before its backlog is taken over",
        ),
        "acl": (
            {},
            "per-group permissions: {group = {publish = [topics], subscribe = [topics]}}, "
            'a topic name or "*"; absent or empty = open, else what is not granted is denied',
        ),
        "maxBindingsPerGroupTopic": (
            DEFAULT_MAX_BINDINGS_PER_GROUP_TOPIC,
            "most bindings one group may hold for one topic; more are refused at declaration",
        ),
        "hport": (
            0,
            "port of the HTTP publish API, on the -bind host (0 = off); -hport overrides it",
        ),
        "maxPatternLength": (
            MAX_PATTERN_LENGTH,
            f"longest regex binding pattern in characters (1..{MAX_PATTERN_LENGTH})",
        ),
        "webhookAllow": (
            [],
            "URL patterns webhook groups may call (scheme://host[:port|:*][/path prefix]); "
            "empty = no webhooks",
        ),
        "webhooks": (
            [],
            "webhook groups: [[clusters.<name>.webhooks]] with group, url, topic, messageType, "
            "bindType, watermark, persistent, concurrency, timeoutSeconds",
        ),
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    env: str
    registry: str
    topics: tuple[str, ...]
    db: str
    delivery_seconds: float
    max_deliver_workers: int
    max_flights: int
    recover_seconds: float
    no_binding_retention_seconds: float
    history_messages: int
    history_retention_seconds: float
    tx_check_delay_seconds: float
    tx_check_interval_seconds: float
    tx_check_max: int
    recieve_permits_per_second: int
    # keys set in the file that KiteQ knows and this broker ignores (warned at start-up)
    ignored: tuple[str, ...]
    delivery_first: bool
    accept_any_secret: bool
    secrets: Mapping[str, str]
    admin_secret: str
    takeover: bool = True
    takeover_grace_seconds: float = 30.0
    admin_open: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    acl: Permissions = dataclasses.field(default_factory=Permissions)
    max_bindings_per_group_topic: int = DEFAULT_MAX_BINDINGS_PER_GROUP_TOPIC
    max_pattern_length: int = MAX_PATTERN_LENGTH
    # the HTTP publish API's port; 0: off
    hport: int = 0
    # outbound webhooks (kiteq.core.webhook): what may be called, and the configured groups
    webhook_policy: WebhookPolicy = dataclasses.field(default_factory=WebhookPolicy)
    webhooks: tuple[ConfiguredWebhook, ...] = ()
    dedup_window_seconds: float = DEFAULT_DEDUP_WINDOW_SECONDS

    @property
    def dev(self) -> bool:
        """A development cluster: named ``*_dev``, or accepting any group secret.

        ``acceptAnySecret = true`` already trusts every client that can reach the port,
        so there is nothing for an admin secret to protect. Every other cluster (one that
        checks group secrets, like ``zk_online``) is production-shaped.
        """
        return self.name.endswith("_dev") or self.accept_any_secret

    @property
    def any_topic(self) -> bool:
        return ANY_TOPIC in self.topics

    def serves(self, topic: str) -> bool:
        return self.any_topic or topic in self.topics

    def check_secret(self, group: str, secret: str) -> bool:
        """Constant-time check of *group*'s secret."""
        expected = self.secrets.get(group)
        if expected is None:
            return self.accept_any_secret
        if expected.startswith("sha256:"):
            import hashlib

            digest = hashlib.sha256(secret.encode()).hexdigest()
            return hmac.compare_digest(digest, expected.removeprefix("sha256:").lower())
        return hmac.compare_digest(secret.encode(), expected.encode())


def load_cluster(path: str | Path, cluster: str) -> ClusterConfig:
    """Read *path* and return the validated ``[clusters.<cluster>]`` section.

    Raises:
        ConfigError: The file is missing or unreadable, the cluster is unknown, or a key is
            unknown or has a bad value.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    clusters = doc.get("clusters", {})
    if not isinstance(clusters, dict) or cluster not in clusters:
        known = ", ".join(sorted(clusters)) if isinstance(clusters, dict) else ""
        raise ConfigError(
            f"unknown cluster {cluster!r} in {path}; known clusters: {known or 'none'}"
        )
    section = clusters[cluster]
    if not isinstance(section, dict):
        raise ConfigError(f"clusters.{cluster} must be a table")
    return _build(path, doc, cluster, section)


def _build(path: Path, doc: dict[str, Any], name: str, section: dict[str, Any]) -> ClusterConfig:
    prefix = f"clusters.{name}"
    unknown = sorted(set(section) - set(CLUSTER_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key; known keys: {', '.join(CLUSTER_DEFAULTS)}"
        )
    params = Params(section, lambda key: f"{prefix}.{key}")

    def default(key: str) -> Any:
        return CLUSTER_DEFAULTS[key][0]

    def seconds(key: str) -> float:
        return params.number(key, default(key))

    def count(key: str) -> int:
        return params.integer(key, default(key))

    def flag(key: str) -> bool:
        return params.flag(key, default(key))

    def text(key: str) -> str:
        return params.string(key, default(key))

    env = text("env")
    registry = _registry(path, doc, prefix, env)

    topics: list[str] = []
    for topic in params.array("topics", default("topics")):
        if not isinstance(topic, str) or (topic != ANY_TOPIC and not is_name(topic)):
            raise ConfigError(f"{prefix}.topics: invalid topic {topic!r}")
        topics.append(topic)
    if not topics:
        raise ConfigError(f'{prefix}.topics: empty; use ["*"] to serve any topic')

    db = text("db") or f"rocksdb://./db/{name}?fsync=batch"
    if "://" not in db:
        raise ConfigError(f"{prefix}.db: expected a store URL like rocksdb://./db/x, got {db!r}")

    # validated as KiteQ does, then ignored: the dead-letter queue has no daily sweep here
    params.integer("dlqExecHour", default("dlqExecHour"), low=0, high=23)
    ignored = tuple(key for key in IGNORED_KEYS if key in section)

    secrets: dict[str, str] = {}
    for group, secret in params.table("secrets", default("secrets")).items():
        if not is_name(group) or not isinstance(secret, str) or not secret:
            raise ConfigError(f"{prefix}.secrets.{group}: expected a non-empty string secret")
        secrets[group] = secret

    max_pattern_length = params.integer(
        "maxPatternLength", MAX_PATTERN_LENGTH, high=MAX_PATTERN_LENGTH
    )

    webhook_policy = WebhookPolicy(
        parse_allow(
            params.array("webhookAllow", default("webhookAllow")), f"{prefix}.webhookAllow"
        ),
        MappingProxyType(secrets),
    )
    webhooks = parse_webhooks(
        params.array("webhooks", default("webhooks")), f"{prefix}.webhooks", webhook_policy
    )
    dedup_window = params.number(
        "dedupWindowSeconds", default("dedupWindowSeconds"), allow_zero=True
    )
    if dedup_window > MAX_DEDUP_WINDOW_SECONDS:
        raise ConfigError(
            f"{prefix}.dedupWindowSeconds: must be at most {MAX_DEDUP_WINDOW_SECONDS}, "
            f"got {dedup_window!r}"
        )

    return ClusterConfig(
        name=name,
        env=env,
        registry=registry,
        topics=tuple(topics),
        db=db,
        delivery_seconds=seconds("deliverySeconds"),
        max_deliver_workers=count("maxDeliverWorkers"),
        max_flights=count("maxFlights"),
        recover_seconds=seconds("recoverSeconds"),
        no_binding_retention_seconds=seconds("noBindingRetentionSeconds"),
        history_messages=count("historyMessages"),
        history_retention_seconds=seconds("historyRetentionSeconds"),
        tx_check_delay_seconds=seconds("txCheckDelaySeconds"),
        tx_check_interval_seconds=seconds("txCheckIntervalSeconds"),
        tx_check_max=count("txCheckMax"),
        recieve_permits_per_second=count("recievePermitsPerSecond"),
        ignored=ignored,
        delivery_first=flag("deliveryFirst"),
        accept_any_secret=flag("acceptAnySecret"),
        secrets=MappingProxyType(secrets),
        admin_secret=_admin_secret(prefix, text("adminSecret"), text("adminSecretFile")),
        admin_open=flag("adminOpen"),
        tls_cert=text("tlsCert"),
        tls_key=text("tlsKey"),
        tls_client_ca=text("tlsClientCa"),
        takeover=flag("takeover"),
        takeover_grace_seconds=seconds("takeoverGraceSeconds"),
        acl=parse_acl(f"{prefix}.acl", section.get("acl", default("acl"))),
        max_bindings_per_group_topic=count("maxBindingsPerGroupTopic"),
        max_pattern_length=max_pattern_length,
        hport=params.integer("hport", default("hport"), low=0, high=MAX_PORT),
        webhook_policy=webhook_policy,
        webhooks=webhooks,
        dedup_window_seconds=dedup_window,
    )


def _registry(path: Path, doc: dict[str, Any], prefix: str, env: str) -> str:
    """The registry URL of ``[registry.<env>]``; the embedded one when *env* is empty."""
    if not env:
        return EMBEDDED_REGISTRY
    registries = doc.get("registry", {})
    entry = registries.get(env) if isinstance(registries, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("hosts"), str):
        raise ConfigError(f"{prefix}.env: no [registry.{env}] with a hosts string in {path}")
    registry: str = entry["hosts"].strip() or EMBEDDED_REGISTRY
    if not registry.startswith(("embedded://", "file://", "zk://")):
        raise ConfigError(
            f"registry.{env}.hosts: unsupported scheme in {registry!r} "
            "(embedded://, file://, zk://)"
        )
    return registry


def _admin_secret(prefix: str, secret: str, secret_file: str) -> str:
    if secret and secret_file:
        raise ConfigError(
            f"{prefix}.adminSecretFile: give adminSecret or adminSecretFile, not both"
        )
    if secret_file:
        return read_secret_file(secret_file, f"{prefix}.adminSecretFile")
    return secret


def read_secret_file(path: str | Path, name: str) -> str:
    """The first line of *path*, without surrounding whitespace; *name* is the key in errors.

    Raises:
        ConfigError: The file cannot be read or its first line is empty.
    """
    try:
        with Path(path).open(encoding="utf-8") as fh:
            secret = fh.readline(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read the secret from {str(path)!r}: {exc}") from exc
    if not secret:
        raise ConfigError(f"{name}: {str(path)!r} holds no secret (its first line is empty)")
    return secret
