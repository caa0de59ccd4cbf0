"""The static registry file (KiteQ's ``registry_demo.yaml``, as TOML): brokers and bindings.

Format (``conf/registry_demo.toml``)::

    [[brokers]]
    address = "127.0.0.1:13800"          # host:port clients dial
    topics = ["trade", "user-profile"]   # or ["*"]: every topic

    [[bindings]]
    groupIds = ["acct-svc"]              # one binding per group
    topic = "trade"
    messageType = "pay-succ"             # optional for fanout ("*")
    bindType = "direct"                  # direct | regx (or regex) | fanout; default direct
    watermark = 1000                     # optional, messages/s; 0 = no cap
    persistent = true                    # optional, default true
    webhook = { url = "http://127.0.0.1:8080/hooks/acct" }   # optional: a webhook group

``read_registry_file`` is shared with the client library (its broker list), so this module
imports nothing server-only; regex syntax is checked only by the broker's
``FileBindingRegistry``, through the ``BindingTable`` it is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from kiteq.binding.base import StandaloneRegistry
from kiteq.binding.model import (
    MISSING,
    Binding,
    BindType,
    bind_type_from_name,
    read_field,
    webhook_from_json,
)
from kiteq.core.errors import PermissionDeniedError, RegistryError
from kiteq.core.limits import is_name

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable

__all__ = [
    "BrokerEntry",
    "FileBindingRegistry",
    "RegistryFile",
    "parse_registry",
    "read_registry_file",
]

logger = logging.getLogger(__name__)

ANY_TOPIC: Final = "*"
_TOP_KEYS: Final = frozenset({"brokers", "bindings"})
# "env" is KiteQ's (parsed there, unused): accepted and ignored
_BROKER_KEYS: Final = frozenset({"address", "topics", "env"})
_BINDING_KEYS: Final = frozenset(
    {"groupIds", "topic", "messageType", "bindType", "watermark", "persistent", "webhook"}
)


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerEntry:
    """A broker and the topics it serves (``"*"``: every topic)."""

    address: str
    topics: tuple[str, ...]

    def serves(self, topic: str) -> bool:
        return topic in self.topics or ANY_TOPIC in self.topics


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryFile:
    """A parsed registry file; ``bindings`` holds one binding per (entry, group)."""

    brokers: tuple[BrokerEntry, ...] = ()
    bindings: tuple[Binding, ...] = ()

    def brokers_for(self, topic: str) -> list[str]:
        """Addresses of the brokers serving *topic*, in file order."""
        return [broker.address for broker in self.brokers if broker.serves(topic)]


def read_registry_file(
    path: str | Path, *, check: Callable[[Binding], object] | None = None
) -> RegistryFile:
    """Read and validate a registry file (blocking I/O).

    Args:
        path: The TOML file.
        check: Extra validation of each binding (raises ``ValueError``); the broker
            passes its RE2 check here.

    Raises:
        RegistryError: The file is unreadable or invalid; the message names the file and
            the entry.
    """
    return parse_registry(_read_bytes(Path(path)), source=str(path), check=check)


def _check(table: BindingTable, binding: Binding) -> None:
    _check_all(table, binding.topic, binding.group_id, (binding,))


def _check_all(table: BindingTable, topic: str, group: str, bindings: Sequence[Binding]) -> None:
    """``table.validate``, a permission refusal included as a ``ValueError``."""
    try:
        table.validate(topic, group, bindings)
    except PermissionDeniedError as exc:
        raise ValueError(exc.reason) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read registry file {path}: {exc.strerror}") from exc


def parse_registry(
    data: bytes, *, source: str, check: Callable[[Binding], object] | None = None
) -> RegistryFile:
    """Parse registry file content; *source* names it in errors (see ``read_registry_file``)."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"{source}: invalid TOML: {exc}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise RegistryError(
            f"{source}: unknown key {unknown[0]!r}; expected [[brokers]] and [[bindings]]"
        )
    brokers: list[BrokerEntry] = []
    bindings: list[Binding] = []
    for kind, index, entry in _entries(source, doc):
        try:
            if kind == "brokers":
                brokers.append(_parse_broker(entry, brokers))
            else:
                for binding in _parse_binding(entry):
                    if check is not None:
                        check(binding)
                    bindings.append(binding)
        except ValueError as exc:
            raise RegistryError(f"{source}: [[{kind}]] entry {index}: {exc}") from None
    return RegistryFile(brokers=tuple(brokers), bindings=tuple(bindings))


def _entries(source: str, doc: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(kind, 1-based index, table) for every ``[[brokers]]`` and ``[[bindings]]`` entry."""
    result = []
    for kind, known in (("brokers", _BROKER_KEYS), ("bindings", _BINDING_KEYS)):
        entries = doc.get(kind, [])
        if not isinstance(entries, list):
            raise RegistryError(f"{source}: {kind} must be an array of tables ([[{kind}]])")
        for index, entry in enumerate(entries, 1):
            if not isinstance(entry, dict):
                raise RegistryError(f"{source}: [[{kind}]] entry {index}: not a table")
            unknown = sorted(set(entry) - known)
            if unknown:
                raise RegistryError(
                    f"{source}: [[{kind}]] entry {index}: unknown key {unknown[0]!r}; "
                    f"known keys: {', '.join(sorted(known))}"
                )
            result.append((kind, index, entry))
    return result


def _parse_broker(entry: dict[str, Any], previous: Sequence[BrokerEntry]) -> BrokerEntry:
    address = _get(entry, "address", str)
    if any(b.address == address for b in previous):
        raise ValueError(f"duplicate address {address!r}")
    host, sep, port = address.rpartition(":")
    if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"address must be host:port, got {address!r}")
    topics = _get(entry, "topics", list)
    for topic in topics:
        if not (isinstance(topic, str) and (topic == ANY_TOPIC or is_name(topic))):
            raise ValueError(f"invalid topic {topic!r}")
    return BrokerEntry(address=address, topics=tuple(topics))


def _parse_binding(entry: dict[str, Any]) -> list[Binding]:
    groups = _get(entry, "groupIds", list)
    if not groups or any(not isinstance(group, str) for group in groups):
        raise ValueError(f"groupIds must be a non-empty list of group names, got {groups!r}")
    bind_type = bind_type_from_name(_get(entry, "bindType", str, "direct"))
    default_type: object = "*" if bind_type is BindType.FANOUT else MISSING
    template = Binding(
        topic=_get(entry, "topic", str),
        message_type=_get(entry, "messageType", str, default_type),
        bind_type=bind_type,
        watermark=_get(entry, "watermark", int, 0),
        persistent=_get(entry, "persistent", bool, True),
        webhook=webhook_from_json(entry["webhook"], label=str) if "webhook" in entry else None,
    )
    bindings = []
    for group in groups:
        binding = template.with_group(group)
        binding.check()
        bindings.append(binding)
    return bindings


_T = TypeVar("_T")


def _get(entry: dict[str, Any], key: str, kind: type[_T], default: object = MISSING) -> _T:
    # the file's messages name a key bare (``topic is missing``), as its TOML spells it
    return read_field(entry, key, kind, default, label=str)


class FileBindingRegistry(StandaloneRegistry):
    """The broker's bindings from a registry file, reloaded every *reload_seconds*.

    A reload applies additions, changes and removals, one (topic, group) at a time, so a
    group whose entries did not change is never touched. A file that becomes unreadable or
    invalid leaves the last good bindings in place; the error is logged once per change of
    the file. Declarations from connections are ignored: the file is authoritative.
    """

    kind: Final = "file"

    def __init__(self, path: str | Path, *, reload_seconds: float = 60.0) -> None:
        if reload_seconds <= 0:
            raise ValueError(f"reload_seconds must be > 0, got {reload_seconds}")
        self._path = Path(path)
        self._reload_seconds = reload_seconds
        self._table: BindingTable | None = None
        self._applied: set[tuple[str, str]] = set()
        # the last content parsed and why it was rejected: unchanged content is not re-parsed
        self._seen: bytes | None = None
        self._seen_error: RegistryError | None = None
        self._last_error: str | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._brokers: list[str] = []

    async def brokers(self) -> list[str]:
        """The brokers the file lists (as last loaded)."""
        return sorted(self._brokers)

    async def start(self, table: BindingTable) -> None:
        """Load the file into *table* and start the reload task.

        Raises:
            RegistryError: The file is unreadable or invalid (the broker should exit).
        """
        if self._table is not None:
            raise RegistryError(f"file registry {self._path} already started")
        data = await asyncio.to_thread(_read_bytes, self._path)
        registry = await asyncio.to_thread(self._parse, data, table)
        self._table = table
        self._seen = data
        self._apply(table, registry)
        logger.info(
            "file registry loaded path=%s brokers=%d bindings=%d",
            self._path,
            len(registry.brokers),
            len(registry.bindings),
        )
        self._task = asyncio.create_task(
            self._reload_loop(), name=f"kiteq-registry-reload:{self._path}"
        )
        self._task.add_done_callback(self._on_task_done)

    async def declare(self, group: str, bindings: Sequence[Binding]) -> bool:
        """Ignored: the file is authoritative. Always False."""
        logger.debug(
            "file registry ignores declared bindings group=%s bindings=%d", group, len(bindings)
        )
        return False

    async def reload(self) -> bool:
        """Re-read the file now and apply what changed.

        Returns:
            True if the table changed. An unreadable or invalid file is logged (once per
            change) and changes nothing.
        """
        table = self._table
        if table is None:
            raise RegistryError(f"file registry {self._path} not started")
        async with self._lock:
            outcome = await self._poll(table)
            if isinstance(outcome, RegistryError):
                if str(outcome) != self._last_error:
                    self._last_error = str(outcome)
                    logger.error(
                        "registry file rejected, keeping the last good bindings: %s", outcome
                    )
                return False
            self._recovered()
            if outcome is None:
                return False
            changed = self._apply(table, outcome)
        logger.info("file registry reloaded path=%s changed=%s", self._path, changed)
        return changed

    async def stop(self) -> None:
        """Stop the reload task; raise ``RegistryError`` if it had crashed."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() rather than await: a cancellation of stop() itself must propagate
            await asyncio.wait([task])
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RegistryError(f"file registry {self._path} reload task failed") from failure

    async def _poll(self, table: BindingTable) -> RegistryFile | RegistryError | None:
        """The file's new content parsed, the reason it is rejected, or None if unchanged."""
        try:
            data = await asyncio.to_thread(_read_bytes, self._path)
        except RegistryError as exc:
            return exc
        if data == self._seen:
            return self._seen_error
        self._seen = data
        try:
            registry = await asyncio.to_thread(self._parse, data, table)
        except RegistryError as exc:
            self._seen_error = exc
            return exc
        self._seen_error = None
        return registry

    def _parse(self, data: bytes, table: BindingTable) -> RegistryFile:
        # worker thread: validation is pure, the table is not modified here
        source = str(self._path)
        registry = parse_registry(data, source=source, check=functools.partial(_check, table))
        # limits and permissions judge a group's whole list for a topic, not one entry
        wanted: dict[tuple[str, str], list[Binding]] = {}
        for binding in registry.bindings:
            wanted.setdefault((binding.topic, binding.group_id), []).append(binding)
        for (topic, group), bindings in wanted.items():
            try:
                _check_all(table, topic, group, bindings)
            except ValueError as exc:
                raise RegistryError(f"{source}: bindings of group {group!r}: {exc}") from None
        return registry

    def _apply(self, table: BindingTable, registry: RegistryFile) -> bool:
        self._brokers = [broker.address for broker in registry.brokers]
        wanted: dict[tuple[str, str], list[Binding]] = {}
        for binding in registry.bindings:
            wanted.setdefault((binding.topic, binding.group_id), []).append(binding)
        changed = False
        for topic, group in sorted(self._applied - wanted.keys()):
            changed |= table.replace(topic, group, ())
        for (topic, group), bindings in wanted.items():
            changed |= table.replace(topic, group, bindings)
        self._applied = set(wanted)
        return changed

    def _recovered(self) -> None:
        if self._last_error is not None:
            self._last_error = None
            logger.info("registry file readable and valid again path=%s", self._path)

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reload_seconds)
            await self.reload()

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:
            self._failure = failure
            logger.error("file registry reload task crashed path=%s", self._path, exc_info=failure)
