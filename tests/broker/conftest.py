from __future__ import annotations

# the broker-process fixtures of the end-to-end tests
from tests.e2e.fixtures import broker, launch

__all__ = ["broker", "launch"]
