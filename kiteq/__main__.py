"""``python -m kiteq``: the broker CLI (the one module allowed in the namespace root)."""

from __future__ import annotations

from kiteq.broker.commands import kiteq

raise SystemExit(kiteq())
