"""The Grafana dashboard ``ops/grafana/dashboards/kiteq-overview.json``, built as code.

Panels and queries are typed builders of Grafana's own ``grafana-foundation-sdk`` (a dev
dependency: only this generator needs it, never the broker). The JSON is committed so that
Grafana provisioning needs no Python; ``python -m kiteq.ops.dashboard`` rewrites it and
``--check`` exits 1 when the committed file differs (the test command runs it, as it does
``proto/generate.py --check``).

Every query filters on ``$job`` and ``$instance`` and uses ``$__rate_interval``; the
dashboard tests evaluate each one against a real Prometheus scraping a broker.
"""

from __future__ import annotations

from kiteq.ops.dashboard.grafana import DASHBOARD_PATH, build, render
from kiteq.ops.dashboard.main import main

__all__ = ["DASHBOARD_PATH", "build", "main", "render"]
