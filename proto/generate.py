"""Regenerate the protobuf and gRPC modules from ``proto/kiteq/proto/v1/*.proto``.

Run ``python proto/generate.py``; ``--check`` regenerates into a temporary directory and
exits 1 when the committed files differ (the test command runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = Path("kiteq/proto/v1")


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PACKAGE).glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root) for p in (root / PACKAGE).glob("*_pb2*") if p.suffix in {".py", ".pyi"}
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / PACKAGE).mkdir(parents=True)
        generate(out)
        fresh = generated_files(out)
        if options.check:
            current = generated_files(ROOT)
            stale = [str(p) for p in fresh if not (ROOT / p).exists()]
            stale += [
                str(p)
                for p in fresh
                if (ROOT / p).exists() and not filecmp.cmp(out / p, ROOT / p, shallow=False)
            ]
            stale += [str(p) for p in current if p not in fresh]
            if stale:
                print(
                    "generated protobuf code is stale; run python proto/generate.py:",
                    *stale,
                    file=sys.stderr,
                )
                return 1
            print("generated protobuf code is up to date")
            return 0
        for old in generated_files(ROOT):
            (ROOT / old).unlink()
        for path in fresh:
            shutil.copyfile(out / path, ROOT / path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
