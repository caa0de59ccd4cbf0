"""kiteq.core.params: one typed reader for TOML keys and URL query parameters."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kiteq.core.errors import ConfigError
from kiteq.core.params import Params, query_params


def toml(**values: object) -> Params:
    return Params(values, lambda key: f"clusters.c.{key}")


def test_missing_keys_take_the_default() -> None:
    params = toml()
    assert params.number("a", 2.5) == 2.5
    assert params.integer("b", 3) == 3
    assert params.flag("c", True) is True
    assert params.string("d", "x") == "x"
    assert not params.has("a")


def test_typed_values_are_read_as_given() -> None:
    params = toml(a=2, b=7, c=False, d="y", e={"g": 1}, f=[1])
    assert params.number("a", 1.0) == 2.0
    assert params.integer("b", 1, high=7) == 7
    assert params.flag("c", True) is False
    assert params.string("d", "") == "y"
    assert params.table("e", {}) == {"g": 1}
    assert params.array("f", []) == [1]


@pytest.mark.parametrize(
    ("values", "read", "message"),
    [
        ({"a": "5"}, lambda p: p.number("a", 1), "clusters.c.a: expected a number, got '5'"),
        ({"a": True}, lambda p: p.number("a", 1), "clusters.c.a: expected a number"),
        ({"a": 0}, lambda p: p.number("a", 1), "clusters.c.a: must be > 0, got 0.0"),
        ({"a": -1}, lambda p: p.number("a", 1, allow_zero=True), "must be >= 0"),
        ({"a": float("inf")}, lambda p: p.number("a", 1), "must be > 0"),
        ({"a": 1.5}, lambda p: p.integer("a", 1), "clusters.c.a: expected an integer"),
        ({"a": True}, lambda p: p.integer("a", 1), "expected an integer"),
        ({"a": 0}, lambda p: p.integer("a", 1), "must be a positive integer, got 0"),
        ({"a": 24}, lambda p: p.integer("a", 1, low=0, high=23), "must be 0..23, got 24"),
        ({"a": -1}, lambda p: p.integer("a", 0, low=0), "must be an integer >= 0"),
        ({"a": 1}, lambda p: p.flag("a", False), "clusters.c.a: expected true or false"),
        ({"a": 1}, lambda p: p.string("a", ""), "clusters.c.a: expected a string"),
        ({"a": "x"}, lambda p: p.table("a", {}), "clusters.c.a: expected a table"),
        ({"a": "x"}, lambda p: p.array("a", []), "clusters.c.a: expected an array"),
    ],
)
def test_bad_values_name_the_key_and_what_was_expected(
    values: dict[str, object], read: Callable[[Params], object], message: str
) -> None:
    params = Params(values, lambda key: f"clusters.c.{key}")
    with pytest.raises(ConfigError) as info:
        read(params)
    assert message in str(info.value)


def test_query_parameters_are_converted_from_text() -> None:
    params = query_params("n=5&s=0.5&f=TRUE&z=0", {"n", "s", "f", "z"}, "store URL x://")
    assert params.integer("n", 1) == 5
    assert params.number("s", 1.0) == 0.5
    assert params.flag("f", False) is True
    assert params.flag("z", True) is False


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("n=five", "store URL x://: parameter n: expected an integer, got 'five'"),
        ("n=-2", "store URL x://: parameter n: must be a positive integer, got -2"),
        ("s=nan", "store URL x://: parameter s: must be > 0"),
        ("s=soon", "store URL x://: parameter s: expected a number"),
        ("f=yes", "store URL x://: parameter f: expected true or false, got 'yes'"),
        ("n=1&n=2", "store URL x://: parameter n given twice"),
        ("m=1", "store URL x://: unknown parameter 'm'; known: f, n, s"),
        ("n", "store URL x://: malformed query"),
    ],
)
def test_bad_query_parameters(query: str, message: str) -> None:
    def read() -> None:
        params = query_params(query, {"n", "s", "f"}, "store URL x://")
        params.integer("n", 1)
        params.number("s", 1.0)
        params.flag("f", False)

    with pytest.raises(ConfigError) as info:
        read()
    assert message in str(info.value)
