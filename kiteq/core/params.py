"""Typed reading of named settings: a TOML table's keys or a URL's query parameters.

One reader serves ``conf/cluster.toml`` sections and the ``mysql://``, ``rocksdb://`` and
``zk://`` URLs, so every setting is checked the same way and every error names the setting
and says what was expected. TOML values arrive typed (a string is never taken for a
number); query parameters arrive as text and are converted.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from typing import Final, TypeVar

from kiteq.core.errors import ConfigError

__all__ = ["Params", "query_params"]

_T = TypeVar("_T")

_FLAGS: Final = {"true": True, "1": True, "false": False, "0": False}


class Params:
    """Settings by name, each read once with its type and bound.

    Args:
        values: The settings given (missing ones take the default passed to each reader).
        name: How an error names a setting, e.g. ``lambda k: f"clusters.dev.{k}"``.
        text: The values are text (a URL query) to convert, not typed TOML values.
    """

    def __init__(
        self, values: Mapping[str, object], name: Callable[[str], str], *, text: bool = False
    ) -> None:
        self._values = values
        self._name = name
        self._text = text

    def has(self, key: str) -> bool:
        return key in self._values

    def string(self, key: str, default: str) -> str:
        return self._read(key, default, "a string", lambda v: v if isinstance(v, str) else None)

    def flag(self, key: str, default: bool) -> bool:
        return self._read(key, default, "true or false", self._flag)

    def number(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        """A finite number > 0 (or >= 0 with *allow_zero*)."""
        value = self._read(key, default, "a number", self._float)
        if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{self._name(key)}: must be {bound}, got {value!r}")
        return value

    def integer(self, key: str, default: int, *, low: int = 1, high: int | None = None) -> int:
        """An integer in ``low..high`` (no upper bound when *high* is None)."""
        value = self._read(key, default, "an integer", self._int)
        if value < low or (high is not None and value > high):
            if high is not None:
                span = f"{low}..{high}"
            else:
                span = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"{self._name(key)}: must be {span}, got {value!r}")
        return value

    def table(self, key: str, default: Mapping[str, object]) -> Mapping[str, object]:
        return self._read(key, default, "a table", lambda v: v if isinstance(v, dict) else None)

    def array(self, key: str, default: list[object]) -> list[object]:
        return self._read(key, default, "an array", lambda v: v if isinstance(v, list) else None)

    def _read(self, key: str, default: _T, kind: str, convert: Callable[[object], _T | None]) -> _T:
        if key not in self._values:
            return default
        raw = self._values[key]
        value = convert(raw)
        if value is None:
            raise ConfigError(f"{self._name(key)}: expected {kind}, got {raw!r}")
        return value

    def _flag(self, raw: object) -> bool | None:
        if self._text and isinstance(raw, str):
            return _FLAGS.get(raw.lower())
        return raw if isinstance(raw, bool) else None

    def _float(self, raw: object) -> float | None:
        if self._text and isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                return None
        # bool is an int subclass: true is never a number
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return None
        return float(raw)

    def _int(self, raw: object) -> int | None:
        if self._text and isinstance(raw, str):
            return int(raw) if raw.lstrip("-").isdigit() else None
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def query_params(query: str, allowed: Collection[str], where: str) -> Params:
    """The parameters of a URL's *query*, each given at most once and each in *allowed*.

    *where* names the URL in errors (``"store URL mysql://h"``); it must hold no secret.

    Raises:
        ConfigError: A malformed query, an unknown parameter or one given twice.
    """
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"{where}: malformed query: {exc}") from exc
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown parameter {key!r}; known: {', '.join(sorted(allowed))}"
            )
        if key in values:
            raise ConfigError(f"{where}: parameter {key} given twice")
        values[key] = value
    return Params(values, lambda key: f"{where}: parameter {key}", text=True)
