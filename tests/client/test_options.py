"""The typed keyword arguments and the option objects name the same options."""

from __future__ import annotations

import dataclasses

from kiteq.client._options import ConsumerArgs, ConsumerOptions, ProducerArgs, ProducerOptions


def test_producer_args_and_options_agree() -> None:
    names = {field.name for field in dataclasses.fields(ProducerOptions)}
    assert names == set(ProducerArgs.__required_keys__ | ProducerArgs.__optional_keys__)


def test_consumer_args_and_options_agree() -> None:
    names = {field.name for field in dataclasses.fields(ConsumerOptions)}
    assert names == set(ConsumerArgs.__required_keys__ | ConsumerArgs.__optional_keys__)
