from __future__ import annotations

from types import MappingProxyType

import pytest

from kiteq.core.acl import AclMode, Grant, Permissions, parse_acl
from kiteq.core.codes import AckCode, code_for
from kiteq.core.errors import ConfigError, PermissionDeniedError


def test_no_acl_is_open() -> None:
    open_policy = Permissions()
    assert open_policy.mode is AclMode.OPEN
    assert open_policy.may_publish("anyone", "trade")
    assert open_policy.may_subscribe("anyone", "trade")
    assert parse_acl("acl", {}) == open_policy


def test_an_acl_denies_what_it_does_not_grant() -> None:
    acl = parse_acl(
        "acl",
        {
            "pay-svc": {"publish": ["trade"], "subscribe": []},
            "acct-svc": {"subscribe": ["trade", "user-profile"]},
            "audit": {"publish": ["*"], "subscribe": ["*"]},
        },
    )
    assert acl.mode is AclMode.ENFORCED
    assert acl.may_publish("pay-svc", "trade")
    assert not acl.may_publish("pay-svc", "user-profile")
    assert not acl.may_subscribe("pay-svc", "trade")
    assert acl.may_subscribe("acct-svc", "user-profile")
    assert not acl.may_publish("acct-svc", "trade")
    assert acl.may_publish("audit", "anything")
    assert acl.may_subscribe("audit", "anything")
    # a group without an entry may do nothing
    assert not acl.may_publish("stranger", "trade")
    assert not acl.may_subscribe("stranger", "trade")


def test_checks_raise_permission_denied_with_a_reason() -> None:
    acl = Permissions(MappingProxyType({"pay-svc": Grant(publish=frozenset({"trade"}))}))
    acl.check_publish("pay-svc", "trade", "m1")
    with pytest.raises(PermissionDeniedError) as raised:
        acl.check_publish("pay-svc", "user", "m1")
    assert raised.value.message_id == "m1"
    assert raised.value.reason == "group 'pay-svc' may not publish to topic 'user'"
    assert code_for(raised.value) is AckCode.PERMISSION_DENIED
    with pytest.raises(PermissionDeniedError, match="may not subscribe to topic 'trade'"):
        acl.check_subscribe("pay-svc", "trade")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([], "acl: expected a table of groups"),
        ({"g": []}, "acl.g: expected a table"),
        ({"g": {"publish": [1]}}, "acl.g.publish: invalid topic 1"),
        ({"g": {"subscribe": ["pay-*"]}}, "prefix patterns are not supported"),
        ({"g": {"subscribe": ["a/b"]}}, "acl.g.subscribe: invalid topic 'a/b'"),
        ({"g": {"write": []}}, "acl.g.write: unknown key"),
    ],
)
def test_bad_acl_is_named(raw: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("*", r"\*")):
        parse_acl("acl", raw)
