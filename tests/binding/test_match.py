from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from kiteq.binding import match
from kiteq.binding.match import (
    BindingLimits,
    BindingTable,
    RefusalReason,
    Route,
    check_binding,
    compile_pattern,
    validate_bindings,
)
from kiteq.binding.model import Binding, BindType
from kiteq.core.acl import Grant, Permissions
from kiteq.core.errors import PermissionDeniedError
from tests.binding._changes import Changes


# Go regexp.MatchString(pattern, messageType): RE2 syntax, unanchored search.
@pytest.mark.parametrize(
    ("pattern", "message_type", "expected"),
    [
        ("pay", "pay-succ-200", True),
        ("succ", "pay-succ-200", True),
        ("200", "pay-succ-200", True),
        ("^pay$", "pay-succ-200", False),
        ("^pay", "pay-succ-200", True),
        ("^succ", "pay-succ-200", False),
        ("pay-.*", "pay-succ", True),
        ("pay-.*", "refund", False),
        ("^pay-(succ|fail)$", "pay-fail", True),
        ("^pay-(succ|fail)$", "pay-failed", False),
        (r"\d{3}$", "pay-succ-200", True),
        (r"\d{4}$", "pay-succ-200", False),
        ("PAY", "pay", False),
        ("(?i)PAY", "pay", True),
        ("pay.succ", "pay-succ", True),
        (r"pay\.succ", "pay-succ", False),
        (r"\bsucc\b", "pay-succ-200", True),
        (r"\Bsucc", "paysucc", True),
        ("[[:digit:]]+", "v2", True),
        (r"\pL+", "abc", True),
        ("(?P<kind>pay)", "pay", True),
        ("x*", "abc", True),
        ("a|b", "cab", True),
        (r"pay\z", "pay-succ", False),
        (r"succ\z", "pay-succ", True),
    ],
)
def test_regex_is_an_unanchored_re2_search(pattern: str, message_type: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(message_type) is expected


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape sequence"),
        ("(?P<x>a)(?P=x)", "invalid"),
        ("(?=a)", "invalid perl operator"),
        ("(?!a)", "invalid perl operator"),
        ("(?<=a)b", "invalid perl operator"),
        ("(?<!a)b", "invalid perl operator"),
        ("[", "missing ]"),
        ("a)", "unexpected \\)|missing \\("),
        ("a{1001}", "invalid repetition size"),
        (r"\Z", "invalid escape sequence"),
        (r"\pL{1000}", "pattern too large"),
        ("", "1..256 characters"),
        ("a" * 257, "1..256 characters"),
    ],
)
def test_invalid_patterns_are_rejected_with_a_reason(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        compile_pattern(pattern)


def test_invalid_pattern_writes_nothing_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="invalid perl operator"):
        compile_pattern("(?=a)")
    assert capfd.readouterr().err == ""


def test_redos_pattern_runs_in_linear_time() -> None:
    pattern = compile_pattern("(a+)+$")
    text = "a" * 100_000 + "!"
    started = time.perf_counter()
    assert not pattern.matches(text)
    assert compile_pattern("(a|aa)*c").matches("a" * 50_000) is False
    assert time.perf_counter() - started < 1.0


def test_check_binding_compiles_regex_only() -> None:
    check_binding(Binding.direct("trade", "pay-succ"))
    check_binding(Binding.fanout("trade"))
    with pytest.raises(ValueError, match="invalid regex pattern"):
        check_binding(Binding.regex("trade", "(?=x)"))
    with pytest.raises(ValueError, match="invalid message type"):
        check_binding(Binding.direct("trade", "pay-.*"))


def test_validate_bindings_normalises() -> None:
    b = Binding.direct("trade", "pay-succ")
    assert validate_bindings("trade", "g", [b, b, b.with_group("g")]) == (b.with_group("g"),)
    with pytest.raises(ValueError, match="for topic 'other'"):
        validate_bindings("trade", "g", [Binding.direct("other", "x")])
    with pytest.raises(ValueError, match="of group 'h'"):
        validate_bindings("trade", "g", [b.with_group("h")])
    with pytest.raises(ValueError, match="invalid group"):
        validate_bindings("trade", "a/b", [b])
    with pytest.raises(ValueError, match="invalid topic"):
        validate_bindings("..", "g", [])


def _table(*entries: tuple[str, list[Binding]]) -> BindingTable:
    table = BindingTable()
    for group, bindings in entries:
        by_topic: dict[str, list[Binding]] = {}
        for b in bindings:
            by_topic.setdefault(b.topic, []).append(b)
        for topic, items in by_topic.items():
            table.replace(topic, group, items)
    return table


def test_routes_by_kind() -> None:
    table = _table(
        ("acct", [Binding.direct("trade", "pay-succ", watermark=1000)]),
        ("audit", [Binding.regex("trade", "pay-", persistent=False)]),
        ("all", [Binding.fanout("trade", watermark=10)]),
        ("other-topic", [Binding.fanout("user")]),
    )
    assert table.routes("trade", "pay-succ") == (
        Route("acct", True, 1000),
        Route("all", True, 10),
        Route("audit", False, 0),
    )
    assert table.routes("trade", "refund") == (Route("all", True, 10),)
    assert table.routes("trade", "pay-succ-200") == (
        Route("all", True, 10),
        Route("audit", False, 0),
    )
    assert table.routes("unbound", "pay-succ") == ()


def test_group_with_several_matching_bindings_appears_once() -> None:
    table = _table(
        (
            "g",
            [
                Binding.direct("trade", "pay-succ", watermark=100, persistent=False),
                Binding.regex("trade", "^pay", watermark=300, persistent=True),
                Binding.regex("trade", "succ$", watermark=200, persistent=False),
                Binding.direct("trade", "refund", watermark=5000, persistent=False),
            ],
        )
    )
    assert table.routes("trade", "pay-succ") == (Route("g", True, 300),)
    assert table.routes("trade", "refund") == (Route("g", False, 5000),)
    assert table.routes("trade", "x-succ") == (Route("g", False, 200),)


def test_replace_and_remove_never_touch_another_group() -> None:
    table = _table(
        ("a", [Binding.fanout("trade")]),
        ("b", [Binding.direct("trade", "pay")]),
    )
    assert table.replace("trade", "a", [Binding.direct("trade", "refund")])
    assert table.groups("trade") == ["a", "b"]
    assert table.routes("trade", "pay") == (Route("b", True, 0),)
    assert table.remove_group("trade", "a")
    assert table.routes("trade", "pay") == (Route("b", True, 0),)
    assert table.bindings("trade") == [Binding.direct("trade", "pay").with_group("b")]
    assert not table.remove_group("trade", "a")
    assert table.replace("trade", "b", [])
    assert table.topics() == []
    assert table.routes("trade", "pay") == ()


def test_invalid_replace_leaves_the_table_unchanged() -> None:
    good = Binding.direct("trade", "pay")
    table = _table(("g", [good]))
    calls = Changes(table).log
    with pytest.raises(ValueError, match="invalid regex"):
        table.replace(
            "trade", "g", [Binding.direct("trade", "refund"), Binding.regex("trade", "(")]
        )
    with pytest.raises(ValueError, match="for topic"):
        table.replace("trade", "g", [Binding.direct("other", "x")])
    with pytest.raises(ValueError, match="invalid group"):
        table.replace("trade", "", [good])
    assert table.bindings() == [good.with_group("g")]
    assert table.routes("trade", "pay") == (Route("g", True, 0),)
    assert calls == []


def test_routes_are_cached_and_invalidated_per_topic() -> None:
    table = _table(
        ("a", [Binding.regex("trade", "pay")]),
        ("a", [Binding.fanout("user")]),
    )
    first = table.routes("trade", "pay-succ")
    assert table.routes("trade", "pay-succ") is first
    user = table.routes("user", "x")
    table.replace("trade", "b", [Binding.direct("trade", "pay-succ")])
    assert table.routes("user", "x") is user
    assert table.routes("trade", "pay-succ") == (
        Route("a", True, 0),
        Route("b", True, 0),
    )
    table.replace("trade", "a", [Binding.direct("trade", "refund")])
    assert table.routes("trade", "pay-succ") == (Route("b", True, 0),)
    table.remove_group("trade", "b")
    assert table.routes("trade", "pay-succ") == ()


def test_unchanged_replace_keeps_cache_and_does_not_notify() -> None:
    b = Binding.direct("trade", "pay")
    table = _table(("g", [b]))
    calls = Changes(table).log
    cached = table.routes("trade", "pay")
    assert not table.replace("trade", "g", [b.with_group("g")])
    assert table.routes("trade", "pay") is cached
    assert calls == []


def test_route_cache_is_bounded() -> None:
    table = BindingTable(cache_size=3)
    table.replace("trade", "g", [Binding.regex("trade", "^p")])
    types = [f"p{i}" for i in range(10)] + [f"q{i}" for i in range(10)]
    for _ in range(2):
        for message_type in types:
            expected = (Route("g", True, 0),) if message_type[0] == "p" else ()
            assert table.routes("trade", message_type) == expected
    assert len(table._topics["trade"].cache) <= 3
    with pytest.raises(ValueError, match="cache_size"):
        BindingTable(cache_size=0)


def test_listeners_are_called_after_each_change() -> None:
    table = BindingTable()
    seen: list[tuple[str, str, list[str]]] = []

    def listener(topic: str, group: str) -> None:
        seen.append((topic, group, table.groups(topic)))

    def broken(topic: str, group: str) -> None:
        raise RuntimeError("listener bug")

    table.add_listener(broken)
    table.add_listener(listener)
    table.replace("trade", "a", [Binding.fanout("trade")])
    table.replace("trade", "b", [Binding.fanout("trade")])
    table.remove_group("trade", "a")
    assert seen == [("trade", "a", ["a"]), ("trade", "b", ["a", "b"]), ("trade", "a", ["b"])]
    table.remove_listener(listener)
    table.remove_listener(listener)
    table.remove_group("trade", "b")
    assert len(seen) == 3
    assert table.topics() == []


def test_listings() -> None:
    table = _table(
        ("z", [Binding.fanout("trade"), Binding.direct("user", "x")]),
        ("a", [Binding.regex("trade", "p"), Binding.direct("trade", "q")]),
    )
    assert table.topics() == ["trade", "user"]
    assert table.groups("trade") == ["a", "z"]
    assert table.groups("none") == []
    assert table.bindings() == [
        Binding.regex("trade", "p").with_group("a"),
        Binding.direct("trade", "q").with_group("a"),
        Binding.fanout("trade").with_group("z"),
        Binding.direct("user", "x").with_group("z"),
    ]
    assert table.bindings("user") == [Binding.direct("user", "x").with_group("z")]
    assert table.bindings("none") == []


# Differential check: the cached table against a direct evaluation (Python re is fine
# for these simple patterns, whose semantics are the same in RE2).
_PATTERNS = ["^p", "succ$", "a.b", "p|q", r"\d", "x+y?"]
_TYPES = ["p", "q", "psucc", "a-b", "x1", "xy", "refund", "qsucc"]
_GROUPS = ["g1", "g2", "g3"]


def _built(
    make: Callable[..., Binding], *args: st.SearchStrategy[str]
) -> st.SearchStrategy[Binding]:
    """``make("t", *args)`` with any watermark and persistence."""
    return st.builds(
        make, st.just("t"), *args, watermark=st.integers(0, 7000), persistent=st.booleans()
    )


_binding = st.one_of(
    _built(Binding.direct, st.sampled_from(_TYPES)),
    _built(Binding.regex, st.sampled_from(_PATTERNS)),
    _built(Binding.fanout),
)
_ops = st.lists(st.tuples(st.sampled_from(_GROUPS), st.lists(_binding, max_size=3)), max_size=12)


def _expected(state: dict[str, list[Binding]], message_type: str) -> tuple[Route, ...]:
    routes = []
    for group in sorted(state):
        matched = [
            b
            for b in state[group]
            if b.bind_type is BindType.FANOUT
            or (b.bind_type is BindType.DIRECT and b.message_type == message_type)
            or (b.bind_type is BindType.REGEX and re.search(b.message_type, message_type))
        ]
        if matched:
            routes.append(
                Route(
                    group,
                    any(b.persistent for b in matched),
                    0
                    if any(b.effective_watermark == 0 for b in matched)
                    else max(b.effective_watermark for b in matched),
                )
            )
    return tuple(routes)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_cached_routes_match_direct_evaluation(ops: list[tuple[str, list[Binding]]]) -> None:
    table = BindingTable(cache_size=5)
    state: dict[str, list[Binding]] = {}
    for group, bindings in ops:
        table.replace("t", group, bindings)
        if bindings:
            state[group] = bindings
        else:
            state.pop(group, None)
        for message_type in _TYPES:
            assert table.routes("t", message_type) == _expected(state, message_type)


def test_a_group_is_capped_only_if_every_matching_binding_caps_it() -> None:
    table = BindingTable()
    table.replace(
        "t",
        "g",
        [
            Binding.direct("t", "x", watermark=100).with_group("g"),
            Binding.fanout("t", watermark=300).with_group("g"),
        ],
    )
    assert table.routes("t", "x") == (Route("g", True, 300),)
    table.replace(
        "t",
        "g",
        [
            Binding.direct("t", "x", watermark=100).with_group("g"),
            Binding.fanout("t").with_group("g"),
        ],
    )
    assert table.routes("t", "x") == (Route("g", True, 0),)


# -- limits, permissions, and matching many patterns in one pass ---------------------------

_ACL = Permissions(
    MappingProxyType(
        {"acct": Grant(subscribe=frozenset({"trade"})), "audit": Grant(subscribe=frozenset({"*"}))}
    )
)


def test_bindings_beyond_the_limits_are_refused_and_counted() -> None:
    refused: list[RefusalReason] = []
    table = BindingTable(limits=BindingLimits(3, 10), on_refused=refused.append)
    three = [Binding.direct("trade", f"t{i}") for i in range(3)]
    assert table.replace("trade", "g", three)
    with pytest.raises(ValueError, match=r"declares 4 bindings .* limit is 3 \(maxBindings"):
        table.replace("trade", "g", [*three, Binding.direct("trade", "t3")])
    # duplicates collapse before counting
    assert not table.replace("trade", "g", [*three, three[0]])
    with pytest.raises(ValueError, match=r"pattern of 11 characters .* limit is 10 \(maxPattern"):
        table.replace("trade", "h", [Binding.regex("trade", "a" * 11)])
    table.replace("trade", "h", [Binding.regex("trade", "a" * 10)])
    assert table.groups("trade") == ["g", "h"]
    assert table.bindings("trade")[:3] == [b.with_group("g") for b in three]
    assert refused == [RefusalReason.LIMIT, RefusalReason.LIMIT]


def test_bindings_outside_the_groups_permissions_are_refused() -> None:
    refused: list[RefusalReason] = []
    table = BindingTable(permissions=_ACL, on_refused=refused.append)
    assert table.replace("trade", "acct", [Binding.fanout("trade")])
    assert table.replace("user", "audit", [Binding.fanout("user")])
    with pytest.raises(PermissionDeniedError, match="'acct' may not subscribe to topic 'user'"):
        table.replace("user", "acct", [Binding.fanout("user")])
    with pytest.raises(PermissionDeniedError, match="'stranger' may not subscribe"):
        table.validate("trade", "stranger", [Binding.fanout("trade")])
    # removing is always allowed, and refused declarations changed nothing
    assert not table.replace("user", "acct", [])
    assert table.routes("user", "x") == (Route("audit", True, 0),)
    assert refused == [RefusalReason.PERMISSION, RefusalReason.PERMISSION]


def test_many_regex_bindings_of_many_groups_match_like_separate_searches() -> None:
    table = BindingTable()
    patterns = {
        "a": ["^pay-", r"\d{3}$", "(?i)REFUND", "x|y"],
        "b": ["succ", "^pay-(succ|fail)$", r"\bfail\b"],
        "c": ["^$x", "z+"],
    }
    for group, items in patterns.items():
        table.replace("t", group, [Binding.regex("t", p) for p in items])
    table.replace(
        "t", "b", [*(Binding.regex("t", p) for p in patterns["b"]), Binding.direct("t", "q")]
    )
    for message_type in ["pay-succ", "pay-fail-200", "Refund", "q", "xyz", "none", "fail"]:
        expected = tuple(
            Route(group, True, 0)
            for group, items in sorted(patterns.items())
            if any(compile_pattern(p).matches(message_type) for p in items)
            or (group == "b" and message_type == "q")
        )
        assert table.routes("t", message_type) == expected, message_type


def test_the_maximum_number_of_long_patterns_compiles_and_matches() -> None:
    limits = BindingLimits()
    table = BindingTable(limits=limits)
    width = limits.max_pattern_length - 8
    bindings = [
        Binding.regex("t", f"^n{i:05d}-" + "[a-z0-9]?" * ((width - 8) // 9))
        for i in range(limits.max_per_group_topic)
    ]
    assert all(len(b.message_type) <= limits.max_pattern_length for b in bindings)
    table.replace("t", "g", bindings)
    assert table.routes("t", "n00999-abc") == (Route("g", True, 0),)
    assert table.routes("t", "n01000-abc") == ()


def test_a_route_lookup_is_one_set_scan_whatever_the_number_of_patterns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scans: list[str] = []

    class Counted:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def Match(self, text: str) -> Any:  # noqa: N802  # re2.Set's spelling
            scans.append(text)
            return self._inner.Match(text)

    compile_set = match._compile_set
    monkeypatch.setattr(match, "_compile_set", lambda patterns: Counted(compile_set(patterns)))
    table = BindingTable()
    table.replace("t", "g", [Binding.regex("t", f"^e{i:05d}-") for i in range(1000)])
    types = [f"e{i:05d}-{i}" for i in range(0, 1000, 7)]  # not cached yet: each one scanned
    for message_type in types:
        assert [r.group for r in table.routes("t", message_type)] == ["g"]
    # one pass of the group's Set per lookup: a rule-by-rule scan would make 1000
    assert scans == types
    assert table.routes("t", "nothing") == ()
    assert scans[-1] == "nothing"


def test_route_cache_keeps_recently_used_types() -> None:
    table = BindingTable(cache_size=2)
    table.replace("trade", "g", [Binding.regex("trade", "^p")])
    first = table.routes("trade", "p1")
    table.routes("trade", "p2")
    assert table.routes("trade", "p1") is first  # used again: now the most recent
    table.routes("trade", "p3")  # evicts p2, the least recently used
    assert list(table._topics["trade"].cache) == ["p1", "p3"]


async def test_prepare_computes_uncached_routes_off_the_loop() -> None:
    table = BindingTable()
    table.replace("t", "g", [Binding.regex("t", "^pay-"), Binding.direct("t", "x")])
    table.replace("direct-only", "g", [Binding.direct("direct-only", "x")])
    keys = [("t", "pay-1"), ("t", "pay-1"), ("t", "refund"), ("direct-only", "x"), ("none", "x")]
    await table.prepare(keys)
    cache = table._topics["t"].cache
    assert dict(cache) == {"pay-1": (Route("g", True, 0),), "refund": ()}
    assert table.routes("t", "pay-1") is cache["pay-1"]
    # no regex bindings: nothing to gain from a thread, left to routes()
    assert not table._topics["direct-only"].cache


async def test_prepare_drops_what_a_change_made_stale() -> None:
    table = BindingTable()
    table.replace("t", "g", [Binding.regex("t", "^pay-")])
    preparing = asyncio.create_task(table.prepare([("t", "pay-1")]))
    await asyncio.sleep(0)  # the task has taken its snapshot and waits for the thread
    table.replace("t", "g", [Binding.regex("t", "^refund-")])
    await preparing
    assert "pay-1" not in table._topics["t"].cache
    assert table.routes("t", "pay-1") == ()


async def test_expensive_patterns_are_matched_while_the_loop_goes_on() -> None:
    # each of these makes the Set's DFA build a new state per character of a hostile type
    table = BindingTable()
    patterns = [f"[ab]{{{40 + i}}}a[ab]{{{10 + i}}}" for i in range(20)]
    table.replace("t", "g", [Binding.regex("t", p) for p in patterns])
    rng = random.Random(7)
    types = ["".join(rng.choice("ab") for _ in range(250)) for _ in range(80)]
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    await table.prepare(("t", message_type) for message_type in types)
    spent = time.perf_counter() - started
    ticking.cancel()
    assert all(message_type in table._topics["t"].cache for message_type in types)
    assert spent > 0.1, "the patterns must be expensive for this test to mean anything"
    assert max(gaps) < spent / 2, (max(gaps), spent)
