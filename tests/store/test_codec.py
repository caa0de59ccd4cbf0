from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from kiteq.core.message import Message, StoredMessage
from kiteq.store import codec
from tests.store.helpers import record

_text = st.text(max_size=40)
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

_messages = st.builds(
    Message,
    topic=_text,
    message_type=_text,
    body=st.binary(max_size=2048),
    message_id=_text,
    properties=st.dictionaries(_text, st.text(max_size=200), max_size=8),
    expired_time=_int64,
    deliver_limit=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    group_id=_text,
    commit=st.booleans(),
    fly=st.booleans(),
    create_time=_int64,
    snappy=st.booleans(),
)
_records = st.builds(
    StoredMessage,
    message=_messages,
    publish_time=st.floats(allow_nan=False),
    deliver_count=st.integers(min_value=0, max_value=2**32 - 1),
    succ_groups=st.lists(_text, max_size=5).map(tuple),
    fail_groups=st.lists(_text, max_size=5).map(tuple),
    next_deliver_time=st.floats(allow_nan=False),
    kite_server=_text,
)


def round_trip(r: StoredMessage) -> StoredMessage:
    state = codec.decode_state(codec.encode_state(codec.state_of(r)))
    return codec.decode_message(codec.encode_message(r), state)


@given(_records)
def test_round_trip(r: StoredMessage) -> None:
    assert round_trip(r) == r


def test_round_trip_of_edge_values() -> None:
    r = record(body=b"", properties={"": "", "ключ": "値 ✓ \x00"}, topic="t")
    r.succ_groups = ("", "g")
    r.fail_groups = ("ü",)
    assert round_trip(r) == r
    assert round_trip(r).message.body == b""


def test_state_carries_the_commit_flag_and_the_topic() -> None:
    r = record(commit=False, topic="user")
    state = codec.decode_state(codec.encode_state(codec.state_of(r)))
    assert (state.topic, state.committed) == ("user", False)
    committed = codec.decode_message(codec.encode_message(r), state._replace(committed=True))
    assert committed.message == dataclasses.replace(r.message, commit=True)


def test_records_start_with_the_format_version() -> None:
    r = record()
    assert codec.encode_message(r)[0] == codec.FORMAT_VERSION
    assert codec.encode_state(codec.state_of(r))[0] == codec.FORMAT_VERSION


@pytest.mark.parametrize("mangle", ["version", "truncate", "extend", "empty"])
def test_corrupt_records_raise_value_error(mangle: str) -> None:
    r = record(properties={"k": "v"})
    r.succ_groups = ("g",)
    message = codec.encode_message(r)
    state = codec.encode_state(codec.state_of(r))
    match mangle:
        case "version":
            message, state = b"\x09" + message[1:], b"\x09" + state[1:]
        case "truncate":
            message, state = message[:-1], state[:-1]
        case "extend":
            message, state = message + b"x", state + b"x"
        case _:
            message, state = b"", b""
    with pytest.raises(ValueError, match="record"):
        codec.decode_state(state)
    with pytest.raises(ValueError, match="record"):
        codec.decode_message(message, codec.state_of(r))


def test_truncated_fixed_part_raises_value_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_message(bytes([codec.FORMAT_VERSION, 0, 0]), codec.state_of(record()))
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_state(bytes([codec.FORMAT_VERSION, 0]))
