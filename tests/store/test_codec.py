from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.store import codec
from tests.store.helpers import NOW, acked, dead, mangled, pending, record

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
    deliver_at=st.floats(allow_nan=False),
    ordering_key=_text,
)
_deliveries = st.builds(
    GroupDelivery,
    state=st.sampled_from(GroupState),
    attempts=st.integers(min_value=0, max_value=2**32 - 1),
    next_deliver_time=st.floats(allow_nan=False),
)
_records = st.builds(
    StoredMessage,
    message=_messages,
    publish_time=st.floats(allow_nan=False),
    deliver_count=st.integers(min_value=0, max_value=2**32 - 1),
    groups=st.dictionaries(_text, _deliveries, max_size=5),
    next_deliver_time=st.floats(allow_nan=False),
    only_groups=st.lists(_text, max_size=5).map(tuple),
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
    r.groups = {"": acked(), "g": dead(2**32 - 1, -1.0), "ü": pending(3, NOW + 0.125)}
    r.only_groups = ("", "ü")
    assert round_trip(r) == r
    assert round_trip(r).message.body == b""


def test_a_message_with_no_delivery_time_is_encoded_as_before_scheduled_delivery() -> None:
    r = record()
    plain = codec.encode_message(r)
    r.message = dataclasses.replace(r.message, deliver_at=NOW + 60.5)
    scheduled = codec.encode_message(r)
    assert len(scheduled) == len(plain) + 8
    assert round_trip(r).message.deliver_at == NOW + 60.5


def test_a_message_without_an_ordering_key_is_encoded_as_before_ordered_delivery() -> None:
    r = record()
    plain = codec.encode_message(r)
    r.message = dataclasses.replace(r.message, ordering_key="order-ü")
    keyed = codec.encode_message(r)
    assert len(keyed) == len(plain) + 2 + len("order-ü".encode())
    assert round_trip(r).message.ordering_key == "order-ü"
    # an old record (no flag 8) reads with no key
    assert codec.decode_message(plain, codec.state_of(r)).message.ordering_key == ""
    r.message = dataclasses.replace(r.message, deliver_at=NOW + 1.5)
    both = round_trip(r).message
    assert (both.deliver_at, both.ordering_key) == (NOW + 1.5, "order-ü")


def test_state_carries_the_commit_flag_and_the_topic() -> None:
    r = record(commit=False, topic="user")
    state = codec.decode_state(codec.encode_state(codec.state_of(r)))
    assert (state.topic, state.committed) == ("user", False)
    committed = codec.decode_message(codec.encode_message(r), state._replace(committed=True))
    assert committed.message == dataclasses.replace(r.message, commit=True)


def test_records_start_with_the_format_version() -> None:
    r = record()
    assert codec.encode_message(r)[0] == codec.MESSAGE_VERSION
    assert codec.encode_state(codec.state_of(r))[0] == codec.STATE_VERSION == 2


def test_a_record_no_group_has_tried_costs_what_it_did_before_per_group_state() -> None:
    # version 1 had the same fixed part and wrote nothing more for no succ/fail groups
    r = record(topic="trade")
    assert len(codec.encode_state(codec.state_of(r))) == 26 + len("trade")
    r.groups = {"g": pending(1, NOW)}
    assert len(codec.encode_state(codec.state_of(r))) == 26 + len("trade") + 17 + len("g")


def test_a_state_does_not_share_the_records_groups() -> None:
    r = record()
    r.groups = {"g": pending()}
    state = codec.state_of(r)
    r.groups["g"].attempts = 3
    r.groups["h"] = acked()
    assert state.groups == {"g": pending()}
    decoded = codec.decode_message(codec.encode_message(r), state)
    decoded.groups["g"].attempts = 4
    assert state.groups == {"g": pending()}


@pytest.mark.parametrize("mangle", ["version", "truncate", "extend", "empty"])
def test_corrupt_records_raise_value_error(mangle: str) -> None:
    r = record(properties={"k": "v"})
    r.groups = {"g": acked()}
    message = codec.encode_message(r)
    state = codec.encode_state(codec.state_of(r))
    message, state = mangled(message, state, mangle)
    with pytest.raises(ValueError, match="record"):
        codec.decode_state(state)
    with pytest.raises(ValueError, match="record"):
        codec.decode_message(message, codec.state_of(r))


def test_truncated_fixed_part_raises_value_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_message(bytes([codec.MESSAGE_VERSION, 0, 0]), codec.state_of(record()))
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_state(bytes([codec.STATE_VERSION, 0]))


def test_an_unknown_group_state_code_raises_value_error() -> None:
    r = record(topic="t")
    r.groups = {"g": acked()}
    value = bytearray(codec.encode_state(codec.state_of(r)))
    value[26 + 1 + 4] = 7  # after the fixed part, the topic and the name's length
    with pytest.raises(ValueError, match="group state"):
        codec.decode_state(bytes(value))
