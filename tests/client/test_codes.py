"""One error <-> code table (``kiteq.core.codes.ERROR_FOR_CODE``): the client decodes refusals with it, the broker encodes errors with ``code_for``."""

from __future__ import annotations

from kiteq.client import _wire
from kiteq.core.codes import AckCode, code_for
from kiteq.core.errors import FlowLimitedError, MessageRejectedError
from kiteq.proto.v1 import common_pb2


def test_every_refusal_code_decodes_to_an_error_the_broker_encodes_the_same_way() -> None:
    for code in AckCode:
        if code is AckCode.OK:
            continue
        error = _wire.rejection_error(code, "id-1", "why")
        assert error.retriable == code.retriable, code
        if code in (AckCode.NOT_SERVING, AckCode.UNAUTHENTICATED, AckCode.BATCH_TOO_LARGE):
            continue  # set by the broker directly, never through code_for
        assert code_for(error) is code, code
    assert isinstance(_wire.rejection_error(AckCode.BATCH_TOO_LARGE, "id", ""), FlowLimitedError)


def test_codes_are_the_wire_numbers() -> None:
    assert {code.name: int(code) for code in AckCode} == {
        name.removeprefix("ERROR_CODE_"): value for name, value in common_pb2.ErrorCode.items()
    }


def test_an_unknown_code_is_a_rejection() -> None:
    error = _wire.rejection_error(999, "id-1", "")
    assert type(error) is MessageRejectedError
    assert error.reason == "code 999"
