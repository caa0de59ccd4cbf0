"""The webhook keys of ``[clusters.<name>]``: ``webhookAllow`` and ``[[...webhooks]]``.

::

    [clusters.prod]
    webhookAllow = ["https://hooks.example.com/kiteq", "http://127.0.0.1:*/"]

    [[clusters.prod.webhooks]]
    group = "mail-hook"                      # needs a (plain) secret in [clusters.prod.secrets]
    url = "https://hooks.example.com/kiteq/mail"
    topic = "trade"
    messageType = "pay-succ"                 # optional for fanout
    bindType = "direct"                      # direct | regx (regex) | fanout
    watermark = 0                            # messages/s, 0 = no cap
    persistent = true
    concurrency = 8                          # calls in flight at once
    timeoutSeconds = 5

A URL outside the allow-list, a group without a secret to sign with, or a bad value is a
``ConfigError`` naming the entry: the broker does not start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Final

from kiteq.core.errors import ConfigError
from kiteq.core.limits import is_message_type, is_name
from kiteq.core.params import Params
from kiteq.core.webhook import (
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT_SECONDS,
    AllowList,
    AllowRule,
    WebhookEndpoint,
    WebhookPolicy,
)

__all__ = ["ConfiguredWebhook", "parse_allow", "parse_webhooks"]

_KEYS: Final = frozenset(
    {
        "group",
        "url",
        "topic",
        "messageType",
        "bindType",
        "watermark",
        "persistent",
        "concurrency",
        "timeoutSeconds",
    }
)
_BIND_TYPES: Final = frozenset({"direct", "regx", "regex", "fanout"})


@dataclasses.dataclass(frozen=True, slots=True)
class ConfiguredWebhook:
    """One ``[[clusters.<name>.webhooks]]`` entry: a webhook group's binding.

    ``bind_type`` is KiteQ's name (``direct``, ``regx``/``regex``, ``fanout``); the broker
    turns the entry into a ``kiteq.binding.model.Binding`` (``where`` names it in errors).
    """

    where: str
    group: str
    topic: str
    message_type: str
    bind_type: str
    watermark: int
    persistent: bool
    endpoint: WebhookEndpoint


def parse_allow(patterns: Sequence[object], name: str) -> AllowList:
    """``webhookAllow`` from a config array; ``ConfigError`` naming *name* and the entry."""
    rules = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ConfigError(f"{name}[{index}]: expected a URL pattern string, got {pattern!r}")
        try:
            rules.append(AllowRule.parse(pattern))
        except ValueError as exc:
            raise ConfigError(f"{name}[{index}]: {exc}") from None
    return AllowList(tuple(rules))


def parse_webhooks(
    entries: Sequence[object], name: str, policy: WebhookPolicy
) -> tuple[ConfiguredWebhook, ...]:
    """The ``webhooks`` array, each entry checked against *policy* (allow-list, secrets).

    Raises:
        ConfigError: Names the entry (``clusters.x.webhooks[0].url``) and the cause.
    """
    result = []
    endpoints: dict[str, WebhookEndpoint] = {}
    for index, entry in enumerate(entries):
        where = f"{name}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table ([[...webhooks]])")
        webhook = _parse_entry(where, entry)
        try:
            policy.check(webhook.group, webhook.endpoint)
        except ValueError as exc:
            raise ConfigError(f"{where}.url: {exc}") from None
        # a group is one consumer: every binding of it calls the same endpoint
        first = endpoints.setdefault(webhook.group, webhook.endpoint)
        if first != webhook.endpoint:
            raise ConfigError(
                f"{where}: group {webhook.group!r} has another webhook in an earlier entry; "
                "a group calls one endpoint (same url, concurrency and timeoutSeconds)"
            )
        result.append(webhook)
    return tuple(result)


def _parse_entry(where: str, entry: Mapping[str, object]) -> ConfiguredWebhook:
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; known keys: {', '.join(_KEYS)}")
    params = Params(entry, lambda key: f"{where}.{key}")
    for key in ("group", "url", "topic"):
        if not params.has(key):
            raise ConfigError(f"{where}.{key}: missing")
    group = params.string("group", "")
    topic = params.string("topic", "")
    for key, value in (("group", group), ("topic", topic)):
        if not is_name(value):
            raise ConfigError(f"{where}.{key}: invalid name {value!r}")
    bind_type = params.string("bindType", "direct").lower()
    if bind_type not in _BIND_TYPES:
        raise ConfigError(f"{where}.bindType: expected direct, regx or fanout, got {bind_type!r}")
    message_type = params.string("messageType", "*" if bind_type == "fanout" else "")
    if bind_type == "direct" and not is_message_type(message_type):
        raise ConfigError(f"{where}.messageType: invalid message type {message_type!r}")
    if bind_type in ("regx", "regex") and not message_type:
        raise ConfigError(f"{where}.messageType: a regex binding needs a pattern")
    return ConfiguredWebhook(
        where=where,
        group=group,
        topic=topic,
        message_type=message_type,
        bind_type=bind_type,
        watermark=params.integer("watermark", 0, low=0),
        persistent=params.flag("persistent", True),
        endpoint=WebhookEndpoint(
            url=params.string("url", ""),
            concurrency=params.integer("concurrency", DEFAULT_CONCURRENCY),
            timeout_seconds=params.number("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS),
        ),
    )
