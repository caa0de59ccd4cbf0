"""Binding matching and the broker's in-memory routing table.

Regex bindings are RE2 patterns searched **unanchored**, as Go's ``regexp.MatchString``
does in KiteQ: ``pay`` matches ``pay-succ-200``. RE2 runs in time linear in the input, so a
hostile pattern such as ``(a+)+$`` cannot stall the broker; backreferences and lookarounds
do not exist in RE2 and are rejected when the binding is registered.

This module is server-side: it is the only one in ``kiteq.binding`` that imports ``re2``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import re2

from kiteq.binding.model import MAX_PATTERN_CHARS, Binding, BindType
from kiteq.core.limits import check_name

__all__ = [
    "DEFAULT_ROUTE_CACHE_SIZE",
    "MAX_PATTERN_MEMORY",
    "BindingTable",
    "CompiledPattern",
    "Route",
    "check_binding",
    "compile_pattern",
    "validate_bindings",
]

logger = logging.getLogger(__name__)

# Memory budget of one compiled pattern (program + DFA cache); RE2's default is 8 MiB.
# Binding patterns are at most MAX_PATTERN_CHARS long and match short message types.
MAX_PATTERN_MEMORY: Final = 1 << 20
DEFAULT_ROUTE_CACHE_SIZE: Final = 65_536

_EMPTY: Final[tuple[Route, ...]] = ()


class CompiledPattern:
    """An RE2 pattern compiled for binding matching."""

    __slots__ = ("_regexp", "pattern")

    def __init__(self, pattern: str, regexp: Any) -> None:
        self.pattern = pattern
        self._regexp = regexp

    def matches(self, text: str) -> bool:
        """True if the pattern matches anywhere in *text* (Go ``regexp.MatchString``)."""
        return self._regexp.search(text) is not None

    def __repr__(self) -> str:
        return f"CompiledPattern({self.pattern!r})"


def _options() -> Any:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    # RE2 prints parse errors to stderr unless told not to; we raise them instead
    options.log_errors = False
    return options


_OPTIONS: Final = _options()


def compile_pattern(pattern: str) -> CompiledPattern:
    """Compile a regex binding pattern with RE2.

    Raises:
        ValueError: The pattern is empty, longer than ``MAX_PATTERN_CHARS``, not valid RE2
            syntax (backreferences and lookarounds included), or too large to compile
            within ``MAX_PATTERN_MEMORY``.
    """
    if not 0 < len(pattern) <= MAX_PATTERN_CHARS:
        raise ValueError(
            f"regex pattern must be 1..{MAX_PATTERN_CHARS} characters, got {len(pattern)}"
        )
    try:
        # re2 keeps an LRU of compiled patterns, so recompiling a known pattern is cheap
        regexp = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"invalid regex pattern {pattern!r}: {reason}") from None
    return CompiledPattern(pattern, regexp)


def check_binding(binding: Binding) -> None:
    """Raise ``ValueError`` unless *binding* is valid, regex syntax included."""
    binding.check()
    if binding.bind_type is BindType.REGEX:
        compile_pattern(binding.message_type)


def validate_bindings(topic: str, group: str, bindings: Iterable[Binding]) -> tuple[Binding, ...]:
    """Check a group's bindings for one topic and return them normalised.

    Each binding gets ``group_id = group`` when it has none; exact duplicates are dropped
    (first occurrence kept).

    Raises:
        ValueError: *topic* or *group* is not a valid name, a binding is for another topic
            or group, or a binding is invalid (see ``check_binding``).
    """
    check_name("topic", topic)
    check_name("group", group)
    result: dict[Binding, None] = {}
    for binding in bindings:
        if binding.topic != topic:
            raise ValueError(f"binding for topic {binding.topic!r} given for topic {topic!r}")
        if binding.group_id not in ("", group):
            raise ValueError(f"binding of group {binding.group_id!r} given for group {group!r}")
        normalised = binding if binding.group_id else binding.with_group(group)
        check_binding(normalised)
        result[normalised] = None
    return tuple(result)


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """A group a message goes to.

    Attributes:
        group: The consumer group.
        persistent: True if any of the group's matching bindings is persistent.
        watermark: The group's rate cap in messages/s, 0 = none: the largest among its
            matching bindings, and none if any of them sets none.
    """

    group: str
    persistent: bool
    watermark: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    binding: Binding
    pattern: CompiledPattern | None

    def matches(self, message_type: str) -> bool:
        kind = self.binding.bind_type
        if kind is BindType.FANOUT:
            return True
        if self.pattern is not None:
            return self.pattern.matches(message_type)
        return self.binding.message_type == message_type


def _rule(binding: Binding) -> _Rule:
    if binding.bind_type is BindType.REGEX:
        return _Rule(binding, compile_pattern(binding.message_type))
    return _Rule(binding, None)


class BindingTable:
    """Topic → group → bindings, with a cached ``routes`` lookup per message.

    Not thread-safe: use it from the event loop thread (registries hop onto the loop
    before calling ``replace``). Each change touches exactly one (topic, group); the
    route cache of that topic is dropped and the listeners are called.

    Args:
        cache_size: Most (topic, message type) route results kept; the cache is cleared
            when it is full.
    """

    def __init__(self, *, cache_size: int = DEFAULT_ROUTE_CACHE_SIZE) -> None:
        if cache_size <= 0:
            raise ValueError(f"cache_size must be > 0, got {cache_size}")
        self._rules: dict[str, dict[str, tuple[_Rule, ...]]] = {}
        self._cache: dict[str, dict[str, tuple[Route, ...]]] = {}
        self._cached = 0
        self._cache_size = cache_size
        self._listeners: list[Callable[[str, str], None]] = []

    def replace(self, topic: str, group: str, bindings: Iterable[Binding]) -> bool:
        """Set *group*'s full binding list for *topic*; an empty list removes the group.

        Other groups of the topic are not touched.

        Returns:
            True if the table changed.

        Raises:
            ValueError: A binding is invalid (see ``validate_bindings``); nothing changed.
        """
        rules = tuple(_rule(b) for b in validate_bindings(topic, group, bindings))
        groups = self._rules.get(topic, {})
        current = groups.get(group, ())
        if tuple(r.binding for r in current) == tuple(r.binding for r in rules):
            return False
        if rules:
            self._rules.setdefault(topic, groups)[group] = rules
        else:
            del groups[group]
            if not groups:
                del self._rules[topic]
        self._invalidate(topic)
        logger.info("bindings changed topic=%s group=%s bindings=%d", topic, group, len(rules))
        self._notify(topic, group)
        return True

    def remove_group(self, topic: str, group: str) -> bool:
        """Remove *group*'s bindings for *topic*; True if it had any."""
        if group not in self._rules.get(topic, {}):
            return False
        return self.replace(topic, group, ())

    def routes(self, topic: str, message_type: str) -> tuple[Route, ...]:
        """The groups a message of (*topic*, *message_type*) goes to, sorted by group."""
        by_type = self._cache.get(topic)
        if by_type is not None:
            hit = by_type.get(message_type)
            if hit is not None:
                return hit
        groups = self._rules.get(topic)
        if groups is None:
            return _EMPTY
        result = self._compute(groups, message_type)
        if self._cached >= self._cache_size:
            self._cache.clear()
            self._cached = 0
        self._cache.setdefault(topic, {})[message_type] = result
        self._cached += 1
        return result

    def bindings(self, topic: str | None = None) -> list[Binding]:
        """All bindings (or *topic*'s), ordered by topic, then group."""
        topics = self.topics() if topic is None else [topic]
        return [
            rule.binding
            for t in topics
            for _, rules in sorted(self._rules.get(t, {}).items())
            for rule in rules
        ]

    def topics(self) -> list[str]:
        """Topics with at least one binding, sorted."""
        return sorted(self._rules)

    def groups(self, topic: str) -> list[str]:
        """Groups bound to *topic*, sorted."""
        return sorted(self._rules.get(topic, {}))

    def add_listener(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(topic, group)`` after every change (on the changing thread).

        A listener's exception is logged and does not undo the change or stop the other
        listeners.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str, str], None]) -> None:
        """Stop calling *callback*; unknown callbacks are ignored."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    @staticmethod
    def validate(topic: str, group: str, bindings: Iterable[Binding]) -> tuple[Binding, ...]:
        """What ``replace`` would store, without changing anything (see ``validate_bindings``).

        Registries validate through the table they were given, so that they need not import
        RE2 themselves (the file registry's parser is shared with clients).
        """
        return validate_bindings(topic, group, bindings)

    @staticmethod
    def _compute(groups: dict[str, tuple[_Rule, ...]], message_type: str) -> tuple[Route, ...]:
        routes = []
        for group in sorted(groups):
            matched = [r.binding for r in groups[group] if r.matches(message_type)]
            if matched:
                routes.append(
                    Route(
                        group=group,
                        persistent=any(b.persistent for b in matched),
                        watermark=_loosest(b.effective_watermark for b in matched),
                    )
                )
        return tuple(routes)

    def _invalidate(self, topic: str) -> None:
        dropped = self._cache.pop(topic, None)
        if dropped is not None:
            self._cached -= len(dropped)

    def _notify(self, topic: str, group: str) -> None:
        for callback in tuple(self._listeners):
            try:
                callback(topic, group)
            except Exception:
                # a listener's bug must not leave the table half-notified
                logger.exception("binding listener failed topic=%s group=%s", topic, group)


def _loosest(watermarks: Iterable[int]) -> int:
    """The least restrictive of several caps, where 0 means no cap."""
    rates = list(watermarks)
    return 0 if 0 in rates else max(rates)
