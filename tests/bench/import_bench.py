"""Import time of ``kiteq.client``, and of what a ``zk://`` client adds (kazoo), side by side.

Not a test: run it by hand. Each sample is a fresh interpreter (``python -X importtime``);
the two cases alternate so that a busy machine slows both alike::

    python tests/bench/import_bench.py --repeat 15

``client``: ``import kiteq.client`` (what every client pays, and all a ``brokers=[...]``
client loads). ``client+zk``: the same plus ``kiteq.client._zk_directory`` (kazoo), which
before issue #14 every ``import kiteq.client`` loaded. Columns: median and min of the
cumulative microseconds ``-X importtime`` reports for the top-level modules.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

CASES = {
    "client": "import kiteq.client",
    "client+zk": "import kiteq.client, kiteq.client._zk_directory",
}
_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")


def sample(code: str) -> int:
    """Cumulative microseconds of the modules *code* imports at top level."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    total = 0
    for line in done.stderr.splitlines():
        found = _LINE.match(line)
        # a top-level entry has no leading spaces before its name; only kiteq.* ones count
        if found and found.group(2).startswith("kiteq"):
            total += int(found.group(1))
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    options = parser.parse_args()
    samples: dict[str, list[int]] = {name: [] for name in CASES}
    for _ in range(options.repeat):
        for name, code in CASES.items():
            samples[name].append(sample(code))
    base = statistics.median(samples["client"])
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"{name:10} median {median / 1000:7.1f} ms  min {min(values) / 1000:7.1f} ms  "
            f"ratio {median / base:.2f}"
        )


if __name__ == "__main__":
    main()
