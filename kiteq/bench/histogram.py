"""Latency histograms (HdrHistogram, the ``hdrhistogram`` package: the ``bench`` extra).

The only module that imports ``hdrh``. Values are microseconds, kept to 3 significant
digits from 1 µs to 10 minutes; a child process sends its histogram to the parent in
HdrHistogram's compressed encoding, and the parent adds them up.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from kiteq.core.errors import ConfigError

try:
    from hdrh.histogram import HdrHistogram
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigError(
        "kiteq-bench needs the hdrhistogram package: pip install 'kiteq[bench]'"
    ) from exc

__all__ = ["Latency", "Percentiles"]

_LOWEST_US: Final = 1
_HIGHEST_US: Final = 600_000_000
_DIGITS: Final = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Percentiles:
    """A latency distribution's summary, in milliseconds."""

    count: int
    p50: float
    p99: float
    p999: float
    max: float

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


class Latency:
    """One latency distribution (microsecond values)."""

    def __init__(self) -> None:
        self._hist = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)

    def record_us(self, micros: int) -> None:
        # clamped: a value outside the range would be dropped, and a clock step backwards
        # (wall clock) can make one negative
        self._hist.record_value(min(max(micros, _LOWEST_US), _HIGHEST_US))

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def encode(self) -> str:
        return bytes(self._hist.encode()).decode("ascii")

    def add_encoded(self, encoded: str) -> None:
        if encoded:
            self._hist.add(HdrHistogram.decode(encoded.encode("ascii")))

    def percentiles(self) -> Percentiles:
        hist = self._hist

        def ms(percentile: float) -> float:
            return round(int(hist.get_value_at_percentile(percentile)) / 1000.0, 3)

        count = self.count
        if count == 0:
            return Percentiles(0, 0.0, 0.0, 0.0, 0.0)
        return Percentiles(count, ms(50), ms(99), ms(99.9), round(hist.get_max_value() / 1000.0, 3))
