"""Binding matching and the broker's in-memory routing table.

Regex bindings are RE2 patterns searched **unanchored**, as Go's ``regexp.MatchString``
does in KiteQ: ``pay`` matches ``pay-succ-200``. RE2 runs in time linear in the input, so a
hostile pattern such as ``(a+)+$`` cannot stall the broker; backreferences and lookarounds
do not exist in RE2 and are rejected when the binding is registered.

Routing cost does not grow with the number of patterns: a group's regex bindings for a
topic are one ``re2.Set`` (every pattern in one pass over the message type), its direct
bindings a dict, and each topic has an LRU route cache. What a Set can still cost (its DFA
may build a state per character for patterns like ``[ab]{40}a[ab]{10}``) is paid in a
worker thread for publish batches (``BindingTable.prepare``), and compiling a thousand
patterns likewise (``BindingTable.build``), never on the event loop.

This module is server-side: it is the only one in ``kiteq.binding`` that imports ``re2``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import re2

from kiteq.binding.model import MAX_PATTERN_CHARS, Binding, BindType
from kiteq.core.acl import Permissions
from kiteq.core.config import DEFAULT_MAX_BINDINGS_PER_GROUP_TOPIC
from kiteq.core.errors import PermissionDeniedError
from kiteq.core.limits import check_name
from kiteq.core.webhook import WebhookPolicy

__all__ = [
    "DEFAULT_ROUTE_CACHE_SIZE",
    "MAX_PATTERN_MEMORY",
    "MAX_SET_MEMORY",
    "BindingLimits",
    "BindingTable",
    "CompiledPattern",
    "PreparedBindings",
    "RefusalReason",
    "Route",
    "check_binding",
    "compile_pattern",
    "validate_bindings",
]

logger = logging.getLogger(__name__)

# Memory budget of one compiled pattern (program + DFA cache); RE2's default is 8 MiB.
# Binding patterns are at most MAX_PATTERN_CHARS long and match short message types.
MAX_PATTERN_MEMORY: Final = 1 << 20
# Memory budget of one group's RE2 Set for one topic: its program and its lazily built DFA
# (RE2's default budget). maxBindingsPerGroupTopic patterns of maxPatternLength fit.
MAX_SET_MEMORY: Final = 8 << 20
# route results kept per topic
DEFAULT_ROUTE_CACHE_SIZE: Final = 16_384

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


def _options(max_mem: int) -> Any:
    options = re2.Options()
    options.max_mem = max_mem
    # RE2 prints parse errors to stderr unless told not to; we raise them instead
    options.log_errors = False
    return options


_OPTIONS: Final = _options(MAX_PATTERN_MEMORY)
_SET_OPTIONS: Final = _options(MAX_SET_MEMORY)


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
class BindingLimits:
    """What one group may declare for one topic (``[clusters.<name>]`` keys).

    Attributes:
        max_per_group_topic: ``maxBindingsPerGroupTopic``: most bindings of one group
            for one topic.
        max_pattern_length: ``maxPatternLength``: longest regex pattern in characters.
    """

    max_per_group_topic: int = DEFAULT_MAX_BINDINGS_PER_GROUP_TOPIC
    max_pattern_length: int = MAX_PATTERN_CHARS

    def check(self, topic: str, group: str, bindings: tuple[Binding, ...]) -> None:
        """Raise ``ValueError`` naming the limit *bindings* exceed."""
        if len(bindings) > self.max_per_group_topic:
            raise ValueError(
                f"group {group!r} declares {len(bindings)} bindings for topic {topic!r}; "
                f"the limit is {self.max_per_group_topic} (maxBindingsPerGroupTopic)"
            )
        for binding in bindings:
            length = len(binding.message_type)
            if binding.bind_type is BindType.REGEX and length > self.max_pattern_length:
                raise ValueError(
                    f"regex binding pattern of {length} characters for topic {topic!r}; "
                    f"the limit is {self.max_pattern_length} (maxPatternLength)"
                )


class RefusalReason(enum.Enum):
    """Why a table refused a group's bindings (the label of the refusal metric)."""

    PERMISSION = "permission"
    LIMIT = "limit"
    WEBHOOK = "webhook"


class _GroupRules:
    """One group's bindings for one topic, indexed so that a lookup is one pass.

    Direct bindings are a dict lookup, fanout bindings always match, and all regex
    bindings are one ``re2.Set``: matching costs one scan of the message type however
    many patterns the group has. One Set per group (not per topic) keeps groups apart:
    one group's patterns can neither slow down nor break another group's matching.
    """

    __slots__ = ("_direct", "_fanout", "_regex", "_set", "bindings")

    # immutable once built: worker threads match with it while the loop may replace it

    def __init__(self, bindings: tuple[Binding, ...]) -> None:
        self.bindings = bindings
        self._direct: dict[str, list[Binding]] = {}
        fanout: list[Binding] = []
        regex: list[Binding] = []
        for binding in bindings:
            if binding.bind_type is BindType.DIRECT:
                self._direct.setdefault(binding.message_type, []).append(binding)
            elif binding.bind_type is BindType.FANOUT:
                fanout.append(binding)
            else:
                regex.append(binding)
        self._fanout = tuple(fanout)
        self._regex = tuple(regex)
        self._set = _compile_set(b.message_type for b in regex) if regex else None

    @property
    def has_regex(self) -> bool:
        return self._set is not None

    def matched(self, message_type: str) -> list[Binding]:
        matched = list(self._fanout)
        direct = self._direct.get(message_type)
        if direct is not None:
            matched.extend(direct)
        if self._set is not None:
            hits = self._set.Match(message_type)
            if hits:
                matched.extend(self._regex[i] for i in hits)
        return matched


def _compile_set(patterns: Iterable[str]) -> Any:
    """One unanchored ``re2.Set`` of *patterns* (each already checked alone)."""
    regexps = re2.Set.SearchSet(_SET_OPTIONS)
    count = 0
    try:
        for pattern in patterns:
            regexps.Add(pattern)
            count += 1
        regexps.Compile()
    except re2.error:
        raise ValueError(
            f"{count} regex patterns are too large to match together within "
            f"{MAX_SET_MEMORY >> 20} MiB; use fewer or simpler patterns"
        ) from None
    return regexps


class _TopicRoutes:
    """A topic's groups and its bounded LRU route cache."""

    __slots__ = ("cache", "groups", "regex", "rules")

    def __init__(self) -> None:
        self.groups: dict[str, _GroupRules] = {}
        # (group, rules) sorted by group: a snapshot replaced, never changed, on each change,
        # so that a worker thread can compute routes from it while the table changes
        self.rules: tuple[tuple[str, _GroupRules], ...] = ()
        self.regex = False
        self.cache: collections.OrderedDict[str, tuple[Route, ...]] = collections.OrderedDict()

    def rebuild(self) -> None:
        self.rules = tuple(sorted(self.groups.items()))
        self.regex = any(rules.has_regex for _, rules in self.rules)
        self.cache.clear()


def _compute(rules: tuple[tuple[str, _GroupRules], ...], message_type: str) -> tuple[Route, ...]:
    routes = []
    for group, group_rules in rules:
        matched = group_rules.matched(message_type)
        if matched:
            routes.append(
                Route(
                    group=group,
                    persistent=any(b.persistent for b in matched),
                    watermark=_loosest(b.effective_watermark for b in matched),
                )
            )
    return tuple(routes)


def _compute_all(
    work: list[tuple[tuple[tuple[str, _GroupRules], ...], list[str]]],
) -> list[list[tuple[Route, ...]]]:
    # worker thread: RE2 matching is thread-safe and releases the GIL
    return [[_compute(rules, message_type) for message_type in types] for rules, types in work]


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedBindings:
    """A group's validated bindings for a topic and their compiled matcher (``build``)."""

    topic: str
    group: str
    bindings: tuple[Binding, ...]
    rules: _GroupRules | None  # None: the group is removed from the topic


class BindingTable:
    """Topic → group → bindings, with a cached ``routes`` lookup per message.

    Not thread-safe: use it from the event loop thread (registries hop onto the loop
    before calling ``replace``). Each change touches exactly one (topic, group): that
    group's index is rebuilt, the route cache of that topic is dropped and the listeners
    are called.

    A route-cache miss costs, per group bound to the topic, one dict lookup and one RE2
    Set scan of the message type: it does not grow with the number of patterns.

    Args:
        cache_size: Most route results kept per topic; the least recently used goes first.
        limits: What one group may declare for one topic.
        permissions: Which topics each group may bind.
        webhooks: Which webhook URLs a group's bindings may name (None: none at all).
        on_refused: Called with the reason each time a group's bindings are refused.
    """

    def __init__(
        self,
        *,
        cache_size: int = DEFAULT_ROUTE_CACHE_SIZE,
        limits: BindingLimits | None = None,
        permissions: Permissions | None = None,
        webhooks: WebhookPolicy | None = None,
        on_refused: Callable[[RefusalReason], None] | None = None,
    ) -> None:
        if cache_size <= 0:
            raise ValueError(f"cache_size must be > 0, got {cache_size}")
        self._topics: dict[str, _TopicRoutes] = {}
        self._cache_size = cache_size
        self._limits = BindingLimits() if limits is None else limits
        self._permissions = Permissions() if permissions is None else permissions
        self._webhooks = WebhookPolicy() if webhooks is None else webhooks
        self._on_refused = on_refused
        self._listeners: list[Callable[[str, str], None]] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def replace(self, topic: str, group: str, bindings: Iterable[Binding]) -> bool:
        """Set *group*'s full binding list for *topic*; an empty list removes the group.

        Other groups of the topic are not touched. ``build`` then ``install`` do the same
        in two steps, the expensive one off the loop.

        Returns:
            True if the table changed.

        Raises:
            ValueError: A binding is invalid or a limit is exceeded (see ``validate``);
                nothing changed.
            PermissionDeniedError: *group* may not bind *topic*; nothing changed.
        """
        return self.install(self.build(topic, group, bindings))

    def build(self, topic: str, group: str, bindings: Iterable[Binding]) -> PreparedBindings:
        """Validate *group*'s bindings for *topic* and compile their matcher.

        Thread-safe and pure (apart from counting refusals): registries call it in a worker
        thread, since a thousand long patterns take tens of milliseconds to compile.

        Raises:
            ValueError: See ``validate``.
            PermissionDeniedError: See ``validate``.
        """
        wanted = self.validate(topic, group, bindings)
        return PreparedBindings(topic, group, wanted, _GroupRules(wanted) if wanted else None)

    def install(self, prepared: PreparedBindings) -> bool:
        """Make *prepared* (from ``build``) its group's bindings; True if the table changed."""
        topic, group, wanted = prepared.topic, prepared.group, prepared.bindings
        entry = self._topics.get(topic)
        current = entry.groups.get(group) if entry is not None else None
        if (current.bindings if current is not None else ()) == wanted:
            return False
        if entry is None:
            # a new topic: wanted differs from nothing, so it is not empty
            entry = self._topics[topic] = _TopicRoutes()
        if prepared.rules is not None:
            entry.groups[group] = prepared.rules
        else:
            del entry.groups[group]
        if entry.groups:
            entry.rebuild()
        else:
            del self._topics[topic]
        logger.info("bindings changed topic=%s group=%s bindings=%d", topic, group, len(wanted))
        self._notify(topic, group)
        return True

    def remove_group(self, topic: str, group: str) -> bool:
        """Remove *group*'s bindings for *topic*; True if it had any."""
        entry = self._topics.get(topic)
        if entry is None or group not in entry.groups:
            return False
        return self.replace(topic, group, ())

    def routes(self, topic: str, message_type: str) -> tuple[Route, ...]:
        """The groups a message of (*topic*, *message_type*) goes to, sorted by group."""
        entry = self._topics.get(topic)
        if entry is None:
            return _EMPTY
        cache = entry.cache
        hit = cache.get(message_type)
        if hit is not None:
            cache.move_to_end(message_type)
            return hit
        result = _compute(entry.rules, message_type)
        self._cache_route(entry, message_type, result)
        return result

    async def prepare(self, keys: Iterable[tuple[str, str]]) -> None:
        """Compute the uncached routes of (topic, message type) *keys* off the event loop.

        A publish batch calls this before its messages are dispatched, so that a batch of
        new message types on a topic with regex bindings is matched in a worker thread
        while the loop goes on serving everybody else; ``routes`` then finds them cached.
        One thread does this for the whole table: a group whose patterns are expensive to
        match (RE2 is linear, but a Set's DFA can be made to build a state per character)
        delays batches that need those patterns, never the loop. Topics without regex
        bindings are only dict lookups and stay on the loop.
        """
        wanted: dict[str, list[str]] = {}
        for topic, message_type in keys:
            entry = self._topics.get(topic)
            if entry is not None and entry.regex and message_type not in entry.cache:
                types = wanted.setdefault(topic, [])
                if message_type not in types:
                    types.append(message_type)
        if not wanted:
            return
        entries = [(topic, self._topics[topic]) for topic in wanted]
        snapshots = [entry.rules for _, entry in entries]
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kiteq-routes"
            )
        work = [
            (rules, wanted[topic]) for (topic, _), rules in zip(entries, snapshots, strict=True)
        ]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, _compute_all, work)
        for (topic, entry), rules, found in zip(entries, snapshots, results, strict=True):
            # a change meanwhile replaced the snapshot: those routes would be stale
            if self._topics.get(topic) is entry and entry.rules is rules:
                for message_type, result in zip(wanted[topic], found, strict=True):
                    self._cache_route(entry, message_type, result)

    def _cache_route(
        self, entry: _TopicRoutes, message_type: str, result: tuple[Route, ...]
    ) -> None:
        cache = entry.cache
        cache[message_type] = result
        cache.move_to_end(message_type)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def bindings(self, topic: str | None = None) -> list[Binding]:
        """All bindings (or *topic*'s), ordered by topic, then group."""
        topics = self.topics() if topic is None else [topic]
        result: list[Binding] = []
        for t in topics:
            entry = self._topics.get(t)
            if entry is not None:
                for _, rules in entry.rules:
                    result.extend(rules.bindings)
        return result

    def topics(self) -> list[str]:
        """Topics with at least one binding, sorted."""
        return sorted(self._topics)

    def groups(self, topic: str) -> list[str]:
        """Groups bound to *topic*, sorted."""
        entry = self._topics.get(topic)
        return [] if entry is None else [group for group, _ in entry.rules]

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

    def validate(self, topic: str, group: str, bindings: Iterable[Binding]) -> tuple[Binding, ...]:
        """What ``replace`` would store, without changing anything.

        Registries validate through the table they were given, so that they need not import
        RE2 themselves (the file registry's parser is shared with clients). Pure apart from
        counting refusals: safe to call from a worker thread.

        Raises:
            ValueError: See ``validate_bindings``; or more bindings than
                ``maxBindingsPerGroupTopic``, or a pattern longer than ``maxPatternLength``;
                or a webhook the policy refuses (outside ``webhookAllow``, no secret to
                sign with), or bindings of the group naming different webhooks.
            PermissionDeniedError: *group* may not bind *topic* (an empty list, which
                removes bindings, is always allowed).
        """
        wanted = validate_bindings(topic, group, bindings)
        if not wanted:
            return wanted
        try:
            self._permissions.check_subscribe(group, topic)
        except PermissionDeniedError:
            self._refused(RefusalReason.PERMISSION)
            raise
        try:
            self._limits.check(topic, group, wanted)
        except ValueError:
            self._refused(RefusalReason.LIMIT)
            raise
        try:
            self._check_webhooks(group, wanted)
        except ValueError:
            self._refused(RefusalReason.WEBHOOK)
            raise
        return wanted

    def _check_webhooks(self, group: str, bindings: tuple[Binding, ...]) -> None:
        endpoints = {b.webhook for b in bindings}
        if endpoints == {None}:
            return
        if len(endpoints) > 1:
            raise ValueError(
                f"group {group!r}: its bindings name different webhooks (or some none); a "
                "webhook group calls one endpoint from every binding"
            )
        for endpoint in endpoints:
            if endpoint is not None:
                self._webhooks.check(group, endpoint)

    def _refused(self, reason: RefusalReason) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

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
