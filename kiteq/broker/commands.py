"""Entry points of the broker-side commands (``kiteq``, ``kiteq-schema``, ``python -m kiteq``).

The bare ``pip install kiteq`` is the client library, yet it installs these commands too
(a wheel cannot make a script depend on an extra). Each first checks that the server extra
is installed and, when it is not, says what to install in one line (exit 1) instead of a
``ModuleNotFoundError`` traceback; only then is the broker side imported.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Final

__all__ = ["SERVER_EXTRA_MODULES", "kiteq", "kiteq_schema", "missing_server_extra"]

# top-level modules of the "server" extra in pyproject.toml that the broker side imports
SERVER_EXTRA_MODULES: Final = (
    "grpc_health",
    "grpc_reflection",
    "rocksdict",
    "sqlalchemy",
    "pymysql",
    "prometheus_client",
    "re2",
    "aiohttp",
)


def missing_server_extra() -> list[str]:
    """The server extra's modules that cannot be imported here (empty: installed)."""
    return [name for name in SERVER_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def _require_server_extra(command: str) -> None:
    missing = missing_server_extra()
    if missing:
        print(  # noqa: T201 - the command's one line
            f"{command}: needs the server extra (missing {', '.join(missing)}): "
            'pip install "kiteq[server]"',
            file=sys.stderr,
        )
        raise SystemExit(1)


def kiteq() -> int:
    """``kiteq``: the broker."""
    _require_server_extra("kiteq")
    from kiteq.broker.cli import main

    return main()


def kiteq_schema() -> int:
    """``kiteq-schema``: create or check the MySQL schema."""
    _require_server_extra("kiteq-schema")
    from kiteq.store.mysql import schema_main

    return schema_main()
