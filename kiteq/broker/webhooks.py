"""Webhook groups in the broker: the configured ones installed, the sinks started.

``[[clusters.<name>.webhooks]]`` entries become bindings of the routing table at start (a
refusal is a ``ConfigError`` naming the entry: the broker does not start); the registry's
webhook bindings (ZooKeeper JSON, the registry file, declarations) arrive through the
table like any other binding. ``WebhookSinks`` then gives each webhook group its sink.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding, bind_type_from_name
from kiteq.broker.webhook_http import AiohttpWebhookCaller
from kiteq.core.config import ClusterConfig
from kiteq.core.errors import ConfigError, PermissionDeniedError
from kiteq.core.webhook_config import ConfiguredWebhook
from kiteq.handler.core import BrokerCore
from kiteq.handler.webhook import WebhookSinks

if TYPE_CHECKING:
    from kiteq.ops.metrics import BrokerMetrics

__all__ = ["install_configured_webhooks", "open_webhooks"]


def _binding(entry: ConfiguredWebhook) -> Binding:
    return Binding(
        topic=entry.topic,
        message_type=entry.message_type,
        bind_type=bind_type_from_name(entry.bind_type),
        group_id=entry.group,
        watermark=entry.watermark,
        persistent=entry.persistent,
        webhook=entry.endpoint,
    )


def install_configured_webhooks(table: BindingTable, config: ClusterConfig) -> None:
    """Put the config's webhook bindings into *table*, one list per (topic, group).

    Raises:
        ConfigError: The table refuses one (a regex RE2 rejects, a limit, the acl); the
            message names the first entry of that (topic, group).
    """
    grouped: dict[tuple[str, str], list[ConfiguredWebhook]] = {}
    for entry in config.webhooks:
        if not config.serves(entry.topic):
            raise ConfigError(f"{entry.where}.topic: {entry.topic!r} is not served (topics)")
        grouped.setdefault((entry.topic, entry.group), []).append(entry)
    for (topic, group), entries in grouped.items():
        try:
            table.replace(topic, group, [_binding(e) for e in entries])
        except ValueError as exc:
            raise ConfigError(f"{entries[0].where}: {exc}") from None
        except PermissionDeniedError as exc:
            raise ConfigError(f"{entries[0].where}: {exc.reason}") from None


def open_webhooks(core: BrokerCore, metrics: BrokerMetrics | None = None) -> WebhookSinks:
    """The broker's webhook sinks over one pooled HTTP client (call ``start``)."""
    return WebhookSinks(
        bindings=core.bindings,
        connections=core.connections,
        dispatcher=core.dispatcher,
        history=core.history,
        clock=core.clock,
        caller=AiohttpWebhookCaller(),
        secrets=core.config.secrets,
        delivery_timeout=core.config.delivery_seconds,
        metrics=metrics,
    )
