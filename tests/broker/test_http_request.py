"""HTTP publish requests parsed into messages, and the answers' statuses (no server)."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

from kiteq.broker.http_answers import failure, refusal, retry_after, status_for, success
from kiteq.broker.http_request import (
    Draft,
    credentials,
    idempotent_id,
    is_json,
    parse_batch,
    parse_json_message,
    parse_raw_message,
)
from kiteq.core.codes import ERROR_FOR_CODE, AckCode, Disposition
from kiteq.core.errors import (
    AuthenticationError,
    BodyTooLargeError,
    FlowLimitedError,
    InvalidMessageError,
    NotConnectedError,
    PermissionDeniedError,
    StoreUnavailableError,
    UnknownTopicError,
)
from kiteq.core.ids import is_message_id
from kiteq.core.limits import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_PROPERTIES
from kiteq.handler.connection import StoreAck


def basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


# -- credentials -------------------------------------------------------------------------


def test_credentials_from_headers_or_basic() -> None:
    assert credentials([("X-KiteQ-Group", "pay-svc"), ("X-KiteQ-Secret", "s")]) == ("pay-svc", "s")
    assert credentials([("x-kiteq-group", "pay-svc")]) == ("pay-svc", "")
    assert credentials([("Authorization", basic("pay-svc:s:with:colons"))]) == (
        "pay-svc",
        "s:with:colons",
    )
    # both forms, agreeing
    assert credentials([("X-KiteQ-Group", "pay-svc"), ("Authorization", basic("pay-svc:s"))]) == (
        "pay-svc",
        "s",
    )


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("X-KiteQ-Secret", "s")],
        [("Authorization", "Bearer token")],
        [("Authorization", "Basic !!!")],
        [("Authorization", basic("no-colon"))],
    ],
)
def test_missing_or_undecodable_credentials_are_unauthenticated(
    headers: list[tuple[str, str]],
) -> None:
    with pytest.raises(AuthenticationError):
        credentials(headers)


@pytest.mark.parametrize(
    "headers",
    [
        [("X-KiteQ-Group", "a"), ("X-KiteQ-Group", "b")],
        [("X-KiteQ-Group", "other"), ("Authorization", basic("pay-svc:s"))],
        [("X-KiteQ-Secret", "x"), ("Authorization", basic("pay-svc:s"))],
        [("X-KiteQ-Group", "bad\udcff")],
    ],
)
def test_ambiguous_credentials_are_invalid(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidMessageError):
        credentials(headers)


# -- raw bodies --------------------------------------------------------------------------


def test_raw_body_with_headers() -> None:
    draft = parse_raw_message(
        b"\x00\x01binary",
        [
            ("Content-Type", "application/octet-stream"),
            ("X-KiteQ-Group", "g"),
            ("X-KiteQ-Message-Type", "pay-succ"),
            ("X-KiteQ-Property-OrderId", "42"),
            ("x-kiteq-property-lower", "ü"),
            ("X-KiteQ-Transactional", "true"),
            ("Idempotency-Key", "order-42"),
        ],
    )
    assert draft == Draft(
        message_type="pay-succ",
        body=b"\x00\x01binary",
        properties={"OrderId": "42", "lower": "ü"},
        transactional=True,
        idempotency_key="order-42",
    )
    message = draft.message("trade", "g")
    assert message.message_id == idempotent_id("g", "order-42")
    assert (message.topic, message.group_id, message.commit) == ("trade", "g", False)


def test_raw_body_without_key_gets_a_fresh_id() -> None:
    draft = parse_raw_message(b"x", [("X-KiteQ-Message-Type", "t")])
    assert draft.idempotency_key == ""
    assert not draft.transactional
    first, second = draft.message("trade", "g"), draft.message("trade", "g")
    assert is_message_id(first.message_id)
    assert first.message_id != second.message_id
    assert first.commit


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "X-KiteQ-Message-Type is required"),
        ([("X-KiteQ-Message-Type", "")], "is required"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Message-Type", "b")], "more than once"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Property-", "v")], "property name is empty"),
        (
            [
                ("X-KiteQ-Message-Type", "a"),
                ("X-KiteQ-Property-k", "1"),
                ("X-KiteQ-Property-k", "2"),
            ],
            "more than once",
        ),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Transactional", "maybe")], "true or false"),
        ([("X-KiteQ-Message-Type", "a"), ("Idempotency-Key", "has space")], "visible ASCII"),
        ([("X-KiteQ-Message-Type", "a"), ("Idempotency-Key", "k" * 256)], "visible ASCII"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Delay-Seconds", "soon")], "number of sec"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Delay-Seconds", "-1")], "finite seconds"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Delay-Seconds", "nan")], "finite seconds"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Foo", "1")], "unknown header"),
        ([("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Property-k", "\udcff")], "not UTF-8"),
    ],
)
def test_bad_raw_headers(headers: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        parse_raw_message(b"x", headers)


def test_too_many_property_headers() -> None:
    headers = [("X-KiteQ-Message-Type", "a")]
    headers += [(f"X-KiteQ-Property-p{i}", "v") for i in range(MAX_PROPERTIES + 1)]
    with pytest.raises(InvalidMessageError, match="properties"):
        parse_raw_message(b"x", headers)


# -- JSON --------------------------------------------------------------------------------


def test_json_content_type() -> None:
    assert is_json("application/json")
    assert is_json("Application/JSON; charset=utf-8")
    assert not is_json("application/octet-stream")
    assert not is_json("text/plain")
    assert not is_json("")


def test_json_message() -> None:
    doc = {"messageType": "t", "body": "héllo", "properties": {"k": "v"}, "transactional": True}
    draft = parse_json_message(json.dumps(doc).encode(), [("Idempotency-Key", "k1")])
    assert draft == Draft("t", "héllo".encode(), {"k": "v"}, True, "k1")
    binary = parse_json_message(b'{"messageType": "t", "bodyBase64": "AAEC/w=="}', [])
    assert binary.body == b"\x00\x01\x02\xff"
    keyed = parse_json_message(b'{"messageType": "t", "body": "", "idempotencyKey": "k"}', [])
    assert keyed.idempotency_key == "k"
    assert keyed.body == b""


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not"),
        (b"[]", "expected a JSON object"),
        (b'{"body": "x"}', "messageType"),
        (b'{"messageType": "t"}', "exactly one of body"),
        (b'{"messageType": "t", "body": "x", "bodyBase64": "eA=="}', "exactly one of body"),
        (b'{"messageType": "t", "body": 5}', "body must be a string"),
        (b'{"messageType": "t", "bodyBase64": "not base64!"}', "not standard base64"),
        (b'{"messageType": "t", "body": "\\ud800"}', "not valid Unicode"),
        (b'{"messageType": "t", "body": "x", "properties": {"k": 1}}', "object of strings"),
        (b'{"messageType": "t", "body": "x", "properties": []}', "object of strings"),
        (b'{"messageType": "t", "body": "x", "transactional": "yes"}', "true or false"),
        (b'{"messageType": "t", "body": "x", "idempotencyKey": ""}', "idempotencyKey"),
        (b'{"messageType": "t", "body": "x", "delaySeconds": "5"}', "finite seconds"),
        (b'{"messageType": "t", "body": "x", "delaySeconds": true}', "number of seconds"),
        (b'{"messageType": "t", "body": "x", "delaySeconds": -2}', "finite seconds"),
        (b'{"messageType": "t", "body": "x", "tpyo": 1}', "unknown field 'tpyo'"),
    ],
)
def test_bad_json_messages(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        parse_json_message(body, [])


def test_json_message_refuses_raw_headers_and_conflicting_keys() -> None:
    doc = b'{"messageType": "t", "body": "x", "idempotencyKey": "a"}'
    with pytest.raises(InvalidMessageError, match="disagree"):
        parse_json_message(doc, [("Idempotency-Key", "b")])
    assert parse_json_message(doc, [("Idempotency-Key", "a")]).idempotency_key == "a"
    with pytest.raises(InvalidMessageError, match="go in the JSON"):
        parse_json_message(b'{"messageType": "t", "body": "x"}', [("X-KiteQ-Message-Type", "t")])


def test_batch() -> None:
    items = [{"messageType": "t", "body": str(i), "idempotencyKey": f"k{i}"} for i in range(3)]
    drafts = parse_batch(json.dumps(items).encode(), [("X-KiteQ-Group", "g")])
    assert [d.body for d in drafts] == [b"0", b"1", b"2"]
    ids = {d.message("trade", "g").message_id for d in drafts}
    assert len(ids) == 3


def test_batch_limits() -> None:
    item = {"messageType": "t", "body": "x"}
    assert len(parse_batch(json.dumps([item] * MAX_BATCH_MESSAGES).encode(), [])) == 1000
    with pytest.raises(InvalidMessageError, match="at most 1000"):
        parse_batch(json.dumps([item] * (MAX_BATCH_MESSAGES + 1)).encode(), [])
    with pytest.raises(InvalidMessageError, match="non-empty JSON array"):
        parse_batch(b"[]", [])
    with pytest.raises(InvalidMessageError, match="non-empty JSON array"):
        parse_batch(json.dumps(item).encode(), [])
    with pytest.raises(InvalidMessageError, match=r"message \[1\]: messageType"):
        parse_batch(json.dumps([item, {"body": "x"}]).encode(), [])
    with pytest.raises(InvalidMessageError, match="idempotencyKey"):
        parse_batch(json.dumps([item]).encode(), [("Idempotency-Key", "k")])
    big = {"messageType": "t", "body": "x" * (MAX_BATCH_BYTES // 2 + 1)}
    with pytest.raises(BodyTooLargeError, match="maxBatchBytes"):
        parse_batch(json.dumps([big, big]).encode(), [])


def test_idempotent_id_is_documented_and_scoped_to_the_group() -> None:
    expected = hashlib.sha256(b"pay-svc\norder-42").hexdigest()[:32]
    assert idempotent_id("pay-svc", "order-42") == expected
    assert is_message_id(expected)
    assert idempotent_id("other-svc", "order-42") != expected
    assert idempotent_id("pay-svc", "order-43") != expected


# -- answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidMessageError, 400),
        (BodyTooLargeError, 413),
        (UnknownTopicError, 404),
        (PermissionDeniedError, 403),
        (FlowLimitedError, 429),
        (AuthenticationError, 401),
        (StoreUnavailableError, 503),
        (NotConnectedError, 503),
    ],
)
def test_status_for_errors(error: type[Exception], status: int) -> None:
    assert status_for(error) == status  # type: ignore[arg-type]


def test_every_refusal_code_has_a_4xx_or_5xx_status() -> None:
    for code in AckCode:
        if code is AckCode.OK:
            continue
        status, document = refusal(StoreAck("id", code, "why"))
        assert status == status_for(ERROR_FOR_CODE[code])
        assert 400 <= status < 600
        assert document["error"] == {
            "code": code.name,
            "message": "why",
            "retriable": code.retriable,
        }
    assert refusal(StoreAck("id", AckCode.NOT_SERVING, "draining"))[0] == 503
    assert refusal(StoreAck("id", AckCode.OVERFLOW, ""))[0] == 429


def test_failure_and_success_documents() -> None:
    status, document = failure(BodyTooLargeError("", "too big"))
    assert status == 413
    assert document == {"error": {"code": "TOO_LARGE", "message": "too big", "retriable": False}}
    assert failure(AuthenticationError("no"))[1]["error"]["code"] == "UNAUTHENTICATED"
    stored = StoreAck("i", AckCode.OK, "", Disposition.STORED)
    assert success("i", stored, committed=True) == {"id": "i", "status": "stored"}
    duplicate = StoreAck("i", AckCode.OK, "", Disposition.DUPLICATE)
    assert success("i", duplicate, committed=False) == {
        "id": "i",
        "status": "duplicate",
        "committed": False,
    }


def test_retry_after() -> None:
    assert retry_after(AckCode.OVERFLOW, 1, 100_000) == "1"
    assert retry_after(AckCode.OVERFLOW, 250, 100) == "3"
    assert retry_after(AckCode.NOT_SERVING, 1, 100) == "1"
    assert retry_after(AckCode.INVALID_ARGUMENT, 1, 100) is None


def test_a_delay_schedules_the_message_from_the_request() -> None:
    raw = parse_raw_message(b"x", [("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Delay-Seconds", "5")])
    doc = parse_json_message(b'{"messageType": "a", "body": "x", "delaySeconds": 2.5}', [])
    assert (raw.delay_seconds, doc.delay_seconds) == (5.0, 2.5)
    before = time.time()
    message = raw.message("trade", "pay")
    assert before + 5 <= message.deliver_at <= time.time() + 5
    assert (
        parse_json_message(b'{"messageType": "a", "body": "x"}', []).message("t", "g").deliver_at
        == 0.0
    )


def test_an_ordering_key_from_a_header_or_a_field() -> None:
    raw = parse_raw_message(
        b"x", [("X-KiteQ-Message-Type", "a"), ("X-KiteQ-Ordering-Key", "order-42")]
    )
    doc = parse_json_message(b'{"messageType": "a", "body": "x", "orderingKey": "o-7"}', [])
    assert (raw.message("t", "g").ordering_key, doc.message("t", "g").ordering_key) == (
        "order-42",
        "o-7",
    )
    with pytest.raises(InvalidMessageError, match="orderingKey must be a string"):
        parse_json_message(b'{"messageType": "a", "body": "x", "orderingKey": 7}', [])
