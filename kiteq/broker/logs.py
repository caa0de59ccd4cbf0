"""The broker's log: format and destination, and summaries of per-message events.

``-logFormat=text`` (default) keeps KiteQ-style grep-friendly lines; ``-logFormat=json``
writes one JSON object per line (``ts`` RFC 3339 UTC, ``level``, ``logger``, ``msg``, and
``exc`` for a traceback) for log shippers. Lines go to stderr, and also to
``<logPath>/kiteq.log`` when ``-logPath`` is given (KiteQ's flag; the directory is made).

Per-message events (a dead letter, a refused message) would be one line each: thousands a
minute under a failing consumer. They are counted in metrics always, and the log gets one
summary line per kind and period (``EventSummary``) with the counts by key.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from kiteq.core.errors import ConfigError

__all__ = ["LOG_FILE", "EventSummary", "LogFormat", "configure"]

LOG_FILE: Final = "kiteq.log"
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
# how many keys one summary line names; the rest are summed as "others"
_SUMMARY_KEYS: Final = 10


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"

    def __str__(self) -> str:  # argparse shows the choices as the user types them
        return self.value


class JsonFormatter(logging.Formatter):
    """One JSON object per record; never the body of a message (nothing logs one)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, object] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: LogFormat, path: str | None) -> None:
    """Set up the root logger: stderr, plus ``<path>/kiteq.log`` when *path* is given.

    Raises:
        ConfigError: The log directory cannot be made or the file opened.
    """
    formatter = JsonFormatter() if fmt is LogFormat.JSON else logging.Formatter(_TEXT_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        directory = Path(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(directory / LOG_FILE, encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"-logPath: cannot write {directory / LOG_FILE}: {exc}") from exc
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)


class EventSummary:
    """Counts of one kind of event by key, logged as one line per ``flush``."""

    def __init__(self, logger: logging.Logger, event: str, key_names: str) -> None:
        self._logger = logger
        self._event = event
        self._key_names = key_names
        self._counts: Counter[str] = Counter()

    def add(self, counts: Mapping[str, int]) -> None:
        self._counts.update(counts)

    def flush(self, period: float) -> int:
        """Log the counts gathered since the last flush (nothing when none); their total."""
        total = sum(self._counts.values())
        if total:
            top = self._counts.most_common(_SUMMARY_KEYS)
            shown = " ".join(f"{key}={n}" for key, n in top)
            others = total - sum(n for _, n in top)
            self._logger.info(
                "%s summary last=%.0fs total=%d by %s: %s%s",
                self._event,
                period,
                total,
                self._key_names,
                shown,
                f" others={others}" if others else "",
            )
            self._counts.clear()
        return total
