"""Webhook consumers: the request a broker sends, its signature, and the outbound allow-list.

A webhook group's messages are POSTed to a URL (``kiteq.handler.webhook`` delivers them,
``kiteq.broker.webhook_http`` speaks HTTP). This module is the part both sides of the wire
share and that needs no third-party code: the header names, the signature (so a receiver
written in Python can verify with ``verify_signature``), the URL rules and the allow-list.

Signature (like Stripe's ``Stripe-Signature``, with the message id signed too so that a
replayed body cannot be passed off as another message)::

    X-KiteQ-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>
    signed bytes = "<t>.<message id>." (ASCII) + the body as sent
    key = the group's secret, UTF-8

A receiver recomputes the HMAC, compares in constant time and refuses a timestamp further
than a tolerance (``DEFAULT_TOLERANCE_SECONDS``) from its clock.

Allow-list entries (``webhookAllow``) are URL patterns ``scheme://host[:port][/path]``:
the scheme and host match exactly (case-insensitive; ``*.example.com`` matches any name
under ``example.com``, not the name itself), the port exactly, or any with ``*`` (absent:
the scheme's default), and the path is a prefix on segment boundaries (``/hooks`` allows
``/hooks`` and ``/hooks/x``, not ``/hooksx``; absent or ``/``: any path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "ATTEMPT_HEADER",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_TIMEOUT_SECONDS",
    "DEFAULT_TOLERANCE_SECONDS",
    "GROUP_HEADER",
    "MAX_CONCURRENCY",
    "MAX_TIMEOUT_SECONDS",
    "MESSAGE_ID_HEADER",
    "MESSAGE_TYPE_HEADER",
    "PROPERTY_HEADER_PREFIX",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOPIC_HEADER",
    "AllowList",
    "AllowRule",
    "WebhookEndpoint",
    "WebhookPolicy",
    "check_url",
    "decode_property_name",
    "request_headers",
    "sign",
    "signature_header",
    "signing_key",
    "verify_signature",
]

MESSAGE_ID_HEADER: Final = "X-KiteQ-Message-Id"
ATTEMPT_HEADER: Final = "X-KiteQ-Attempt"
TOPIC_HEADER: Final = "X-KiteQ-Topic"
MESSAGE_TYPE_HEADER: Final = "X-KiteQ-Message-Type"
GROUP_HEADER: Final = "X-KiteQ-Group"
TIMESTAMP_HEADER: Final = "X-KiteQ-Timestamp"
SIGNATURE_HEADER: Final = "X-KiteQ-Signature"
PROPERTY_HEADER_PREFIX: Final = "X-KiteQ-Property-"

DEFAULT_CONCURRENCY: Final = 8
MAX_CONCURRENCY: Final = 1000
DEFAULT_TIMEOUT_SECONDS: Final = 5.0
MAX_TIMEOUT_SECONDS: Final = 300.0
DEFAULT_TOLERANCE_SECONDS: Final = 300.0
MAX_URL_CHARS: Final = 2048

_SCHEMES: Final = {"http": 80, "https": 443}
# RFC 9110 tchar minus "%": what stays as is in a header name or value; the rest is
# percent-encoded (UTF-8), so "%" itself always arrives encoded and decoding is unambiguous
_TOKEN_SAFE: Final = "!#$&'*+-.^_`|~"  # noqa: S105 - characters, not a password
_VALUE_SAFE: Final = _TOKEN_SAFE + ' "(),/:;<=>?@[\\]{}'
_ENCODED_DOT_OR_SLASH: Final = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where a webhook group's messages go.

    Attributes:
        url: The ``http``/``https`` URL each message is POSTed to.
        concurrency: Calls in flight at once for the group (its credit).
        timeout_seconds: A call not answered within it is a failed delivery (at most the
            cluster's ``deliverySeconds``).
    """

    url: str
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid field (the URL's shape included)."""
        check_url(self.url)
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(
                f"webhook concurrency must be 1..{MAX_CONCURRENCY}, got {self.concurrency}"
            )
        if not 0 < self.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise ValueError(
                f"webhook timeoutSeconds must be in (0, {MAX_TIMEOUT_SECONDS:g}], "
                f"got {self.timeout_seconds}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class _Url:
    scheme: str
    host: str
    port: int
    path: str


def check_url(url: str) -> None:
    """Raise ``ValueError`` unless *url* is a webhook URL this broker calls.

    ``http`` or ``https``, a host, no user info (credentials belong in the signature, not
    in logs), no fragment, and a path without dot segments or encoded dots and slashes (so
    that a path prefix in the allow-list means what it says).
    """
    _parse_url(url)


def _parse_url(url: str) -> _Url:
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"webhook URL longer than {MAX_URL_CHARS} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise ValueError(f"webhook URL {url!r} contains whitespace or control characters")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"webhook URL {url!r}: the scheme must be http or https")
    if "@" in parts.netloc:
        raise ValueError(f"webhook URL {url!r}: user info (user:password@) is not allowed")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"webhook URL {url!r}: a fragment (#...) is not allowed")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"webhook URL {url!r} has no host")
    try:
        port = parts.port or _SCHEMES[scheme]
    except ValueError:
        raise ValueError(f"webhook URL {url!r}: invalid port") from None
    path = parts.path or "/"
    segments = path.split("/")
    if "\\" in path or "." in segments or ".." in segments or _ENCODED_DOT_OR_SLASH.search(path):
        raise ValueError(
            f"webhook URL {url!r}: the path may not hold dot segments, backslashes or "
            "encoded dots and slashes"
        )
    return _Url(scheme, host, port, path)


@dataclasses.dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``webhookAllow`` entry; ``port`` None matches any port."""

    pattern: str
    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, pattern: str) -> AllowRule:
        """Parse ``scheme://host[:port|:*][/path]``; raise ``ValueError`` when malformed."""
        scheme, sep, rest = pattern.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in _SCHEMES:
            raise ValueError(f"{pattern!r}: expected http://host[:port][/path] or https://...")
        authority, slash, path = rest.partition("/")
        path = "/" + path if slash else "/"
        host, colon, port_text = _split_authority(authority)
        if host.startswith("[") != host.endswith("]"):
            raise ValueError(f"{pattern!r}: malformed host {host!r}")
        port: int | None
        if not colon:
            port = _SCHEMES[scheme]
        elif port_text == "*":
            port = None
        elif port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise ValueError(f"{pattern!r}: the port must be a number or *, got {port_text!r}")
        host = host.strip("[]").lower()
        wildcard = host.removeprefix("*.")
        if not host or "*" in wildcard or "@" in host or not _plausible_host(wildcard):
            raise ValueError(f"{pattern!r}: the host must be a name, an address or *.domain")
        if "?" in path or "#" in path:
            raise ValueError(f"{pattern!r}: a path prefix has no query or fragment")
        return cls(pattern, scheme, host, port, path)

    def allows(self, url: _Url) -> bool:
        if url.scheme != self.scheme or (self.port is not None and url.port != self.port):
            return False
        if self.host.startswith("*."):
            if not url.host.endswith(self.host[1:]):
                return False
        elif url.host != self.host:
            return False
        prefix = self.path
        if prefix == "/" or url.path == prefix:
            return True
        return url.path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _split_authority(authority: str) -> tuple[str, str, str]:
    """(host, ":" or "", port) of ``host[:port]``; an IPv6 host is in brackets."""
    if authority.endswith("]") or ":" not in authority:
        return authority, "", ""
    return authority.rpartition(":")


def _plausible_host(host: str) -> bool:
    return bool(host) and all(c.isalnum() or c in ".-_:" for c in host)


@dataclasses.dataclass(frozen=True, slots=True)
class AllowList:
    """The ``webhookAllow`` rules; empty: no webhook URL is allowed."""

    rules: tuple[AllowRule, ...] = ()

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> AllowList:
        return cls(tuple(AllowRule.parse(p) for p in patterns))

    def check(self, url: str) -> None:
        """Raise ``ValueError`` unless *url* is well formed and some rule allows it."""
        parsed = _parse_url(url)
        if any(rule.allows(parsed) for rule in self.rules):
            return
        if not self.rules:
            raise ValueError(f"webhook URL {url!r} refused: webhookAllow is empty")
        listed = ", ".join(rule.pattern for rule in self.rules)
        raise ValueError(f"webhook URL {url!r} is not in webhookAllow ({listed})")


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """Which webhooks a broker accepts: allowed URLs, for groups it can sign for.

    Attributes:
        allow: The ``webhookAllow`` rules.
        secrets: The cluster's group secrets; a webhook group needs a plain one (a
            ``sha256:`` hash cannot key an HMAC).
    """

    allow: AllowList = AllowList()
    secrets: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def check(self, group: str, endpoint: WebhookEndpoint) -> None:
        """Raise ``ValueError`` saying why *group* may not have *endpoint*."""
        endpoint.check()
        self.allow.check(endpoint.url)
        signing_key(group, self.secrets)


def signing_key(group: str, secrets: Mapping[str, str]) -> bytes:
    """*group*'s secret as the HMAC key; ``ValueError`` when it has no plain secret."""
    secret = secrets.get(group)
    if not secret:
        raise ValueError(
            f"webhook group {group!r} has no secret to sign with: give it one in secrets"
        )
    if secret.startswith("sha256:"):
        raise ValueError(
            f"webhook group {group!r}: its secret is a sha256: hash, which cannot sign; "
            "a webhook group needs the secret itself"
        )
    return secret.encode("utf-8")


def sign(key: bytes, timestamp: int, message_id: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<message_id>." + body`` under *key*."""
    mac = hmac.new(key, f"{timestamp}.{message_id}.".encode("ascii"), hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


def signature_header(key: bytes, timestamp: int, message_id: str, body: bytes) -> str:
    """The ``X-KiteQ-Signature`` value: ``t=<timestamp>,v1=<signature>``."""
    return f"t={timestamp},v1={sign(key, timestamp, message_id, body)}"


def verify_signature(
    key: bytes,
    header: str,
    message_id: str,
    body: bytes,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """True when *header* signs *message_id* and *body* under *key* within *tolerance*.

    Several ``v1=`` entries are accepted (one matching is enough), as when a sender signs
    with an old and a new secret during a rotation.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance:
        return False
    expected = sign(key, timestamp, message_id, body)
    return any(hmac.compare_digest(expected, s) for s in signatures)


def request_headers(
    *,
    key: bytes,
    timestamp: int,
    message_id: str,
    attempt: int,
    topic: str,
    message_type: str,
    group: str,
    properties: Mapping[str, str],
    body: bytes,
) -> list[tuple[str, str]]:
    """The headers of one webhook call (besides Content-Type and the HTTP library's own).

    Property names and values are percent-encoded UTF-8 where they hold anything beyond
    RFC 9110 token characters (values: visible ASCII) or a ``%``; plain ones go as is.
    """
    headers = [
        (MESSAGE_ID_HEADER, message_id),
        (ATTEMPT_HEADER, str(attempt)),
        (TOPIC_HEADER, topic),
        (MESSAGE_TYPE_HEADER, message_type),
        (GROUP_HEADER, group),
        (TIMESTAMP_HEADER, str(timestamp)),
        (SIGNATURE_HEADER, signature_header(key, timestamp, message_id, body)),
    ]
    for name, value in properties.items():
        headers.append(
            (
                PROPERTY_HEADER_PREFIX + urllib.parse.quote(name, safe=_TOKEN_SAFE),
                urllib.parse.quote(value, safe=_VALUE_SAFE),
            )
        )
    return headers


def decode_property_name(header: str) -> str | None:
    """The property a header carries (``X-KiteQ-Property-<name>``), or None.

    HTTP header names are case-insensitive and many servers change their case: a receiver
    that needs the exact property name should not rely on it.
    """
    if header.lower().startswith(PROPERTY_HEADER_PREFIX.lower()):
        return urllib.parse.unquote(header[len(PROPERTY_HEADER_PREFIX) :])
    return None
