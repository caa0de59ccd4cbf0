"""``python -m kiteq.bench``: the same as ``kiteq-bench``."""

from __future__ import annotations

from kiteq.bench.cli import main

raise SystemExit(main())
