"""``python -m kiteq.ops.dashboard [--check]``: rewrite the committed JSON, or check it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiteq.ops.dashboard.grafana import DASHBOARD_PATH, render

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiteq.ops.dashboard",
        description="Rewrite or check the committed Grafana dashboard JSON.",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON is not up to date"
    )
    parser.add_argument("--output", type=Path, default=DASHBOARD_PATH)
    options = parser.parse_args(argv)
    text = render()
    if options.check:
        current = options.output.read_text(encoding="utf-8") if options.output.exists() else ""
        if current != text:
            sys.stderr.write(
                f"{options.output} is out of date: run python -m kiteq.ops.dashboard\n"
            )
            return 1
        return 0
    options.output.write_text(text, encoding="utf-8")
    return 0
