"""Webhook signing, URL rules, the allow-list and the config keys (kiteq.core.webhook*)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from kiteq.core.config import load_cluster
from kiteq.core.errors import ConfigError
from kiteq.core.webhook import (
    AllowList,
    WebhookEndpoint,
    WebhookPolicy,
    check_url,
    decode_property_name,
    request_headers,
    signature_header,
    verify_signature,
)

KEY = b"s3cret"
MID = "0123456789abcdef0123456789abcdef"


def test_signature_is_hmac_sha256_of_timestamp_id_and_body() -> None:
    header = signature_header(KEY, 1700000000, MID, b'{"order": 42}')
    expected = hmac.new(KEY, f"1700000000.{MID}.".encode() + b'{"order": 42}', hashlib.sha256)
    assert header == f"t=1700000000,v1={expected.hexdigest()}"


def test_verify_accepts_the_signature_and_refuses_any_change() -> None:
    body = b"\x00binary body"
    header = signature_header(KEY, 1000, MID, body)
    assert verify_signature(KEY, header, MID, body, now=1000)
    assert verify_signature(KEY, header, MID, body, now=1299)
    assert not verify_signature(KEY, header, MID, body, now=1301)  # too old: a replay
    assert not verify_signature(KEY, header, MID, body + b"x", now=1000)
    assert not verify_signature(KEY, header, "f" * 32, body, now=1000)  # another message
    assert not verify_signature(b"other", header, MID, body, now=1000)
    assert not verify_signature(KEY, "v1=" + header.split("v1=")[1], MID, body, now=1000)
    # a rotation: several v1 entries, one matching is enough
    rotated = header + ",v1=" + "0" * 64
    assert verify_signature(KEY, rotated, MID, body, now=1000)


def test_request_headers_carry_the_message_and_encode_properties() -> None:
    headers = dict(
        request_headers(
            key=KEY,
            timestamp=1000,
            message_id=MID,
            attempt=3,
            topic="trade",
            message_type="pay-succ",
            group="mail-hook",
            properties={"order": "42", "note": "100% sûr\r\nX-Evil: 1", "a b": "x"},
            body=b"b",
        )
    )
    assert headers["X-KiteQ-Message-Id"] == MID
    assert headers["X-KiteQ-Attempt"] == "3"
    assert headers["X-KiteQ-Topic"] == "trade"
    assert headers["X-KiteQ-Message-Type"] == "pay-succ"
    assert headers["X-KiteQ-Group"] == "mail-hook"
    assert headers["X-KiteQ-Timestamp"] == "1000"
    assert verify_signature(KEY, headers["X-KiteQ-Signature"], MID, b"b", now=1000)
    assert headers["X-KiteQ-Property-order"] == "42"
    # no CR/LF can reach the wire; % and non-ASCII are percent-encoded UTF-8
    assert headers["X-KiteQ-Property-note"] == "100%25 s%C3%BBr%0D%0AX-Evil: 1"
    assert decode_property_name("x-kiteq-property-a%20b") == "a b"
    assert "X-KiteQ-Property-a%20b" in headers
    assert decode_property_name("X-KiteQ-Topic") is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1/x", "scheme"),
        ("http:///x", "no host"),
        ("http://user:pw@127.0.0.1/x", "user info"),
        ("http://127.0.0.1/x#frag", "fragment"),
        ("http://127.0.0.1:99999/x", "port"),
        ("http://127.0.0.1/hooks/../admin", "dot segments"),
        ("http://127.0.0.1/hooks/%2e%2e/admin", "dot segments"),
        ("http://127.0.0.1/hooks%2Fadmin", "dot segments"),
        ("http://127.0.0.1/a b", "whitespace"),
    ],
)
def test_malformed_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_url(url)


ALLOW = AllowList.parse(
    [
        "http://127.0.0.1:*/hooks",
        "https://hooks.example.com/kiteq/",
        "https://*.svc.example.com:8443",
        "http://[::1]:8080/",
    ]
)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hooks",
        "http://127.0.0.1:1/hooks/mail?x=1",
        "https://HOOKS.example.com/kiteq/mail",
        "https://a.b.svc.example.com:8443/anything",
        "http://[::1]:8080/x",
    ],
)
def test_allow_list_allows(url: str) -> None:
    ALLOW.check(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:8080/hooks",  # scheme
        "http://127.0.0.2:8080/hooks",  # host
        "http://127.0.0.1:8080/hooksx",  # a prefix on segment boundaries
        "http://127.0.0.1:8080/",
        "https://hooks.example.com/kiteq",  # the prefix ends with "/"
        "https://hooks.example.com:444/kiteq/x",  # port: the scheme's default only
        "https://svc.example.com:8443/",  # *.domain: not the domain itself
        "https://evilsvc.example.com:8443/",
        "https://a.svc.example.com/",  # port 443, not 8443
        "http://[::1]:8081/x",
    ],
)
def test_allow_list_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="not in webhookAllow"):
        ALLOW.check(url)


def test_empty_allow_list_refuses_everything() -> None:
    with pytest.raises(ValueError, match="webhookAllow is empty"):
        AllowList().check("http://127.0.0.1/x")


@pytest.mark.parametrize(
    "pattern", ["127.0.0.1/x", "gopher://x/", "http://*/", "http://a*b.com/", "http://h:x/"]
)
def test_bad_allow_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"expected|host|port"):
        AllowList.parse([pattern])


def test_policy_needs_an_allowed_url_and_a_plain_secret() -> None:
    policy = WebhookPolicy(ALLOW, {"a": "s", "h": "sha256:" + "0" * 64})
    policy.check("a", WebhookEndpoint("http://127.0.0.1:9/hooks"))
    with pytest.raises(ValueError, match="no secret"):
        policy.check("b", WebhookEndpoint("http://127.0.0.1:9/hooks"))
    with pytest.raises(ValueError, match="cannot sign"):
        policy.check("h", WebhookEndpoint("http://127.0.0.1:9/hooks"))
    with pytest.raises(ValueError, match="concurrency"):
        policy.check("a", WebhookEndpoint("http://127.0.0.1:9/hooks", concurrency=0))


CONFIG = """
[clusters.c]
acceptAnySecret = true
webhookAllow = ["http://127.0.0.1:*/hooks"]
[clusters.c.secrets]
mail-hook = "s3cret"
[[clusters.c.webhooks]]
group = "mail-hook"
url = "{url}"
topic = "trade"
messageType = "pay-succ"
watermark = 5
concurrency = 2
"""


def test_config_reads_webhooks(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(url="http://127.0.0.1:8080/hooks/mail"))
    config = load_cluster(path, "c")
    (webhook,) = config.webhooks
    assert (webhook.group, webhook.topic, webhook.message_type, webhook.bind_type) == (
        "mail-hook",
        "trade",
        "pay-succ",
        "direct",
    )
    assert webhook.watermark == 5
    assert webhook.endpoint == WebhookEndpoint("http://127.0.0.1:8080/hooks/mail", 2, 5.0)


def test_config_refuses_a_url_outside_the_allow_list(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(url="http://10.0.0.1:8080/hooks/mail"))
    with pytest.raises(ConfigError) as info:
        load_cluster(path, "c")
    assert str(info.value).startswith("clusters.c.webhooks[0].url: webhook URL ")
    assert "is not in webhookAllow (http://127.0.0.1:*/hooks)" in str(info.value)


def test_config_refuses_a_webhook_group_without_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        CONFIG.format(url="http://127.0.0.1:1/hooks").replace('mail-hook = "s3cret"', "")
    )
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.url: .*no secret to sign with"):
        load_cluster(path, "c")


def test_config_refuses_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(url="http://127.0.0.1:1/hooks") + "bogus = 1\n")
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.bogus: unknown key"):
        load_cluster(path, "c")
    path.write_text(CONFIG.format(url="http://127.0.0.1:1/hooks") + "timeoutSeconds = -1\n")
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.timeoutSeconds: must be > 0"):
        load_cluster(path, "c")
