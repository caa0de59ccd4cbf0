"""``kiteq``: the broker command line (Go-style single-dash flags, as KiteQ's).

Exit codes: 0 after a clean stop, 1 on a configuration or startup error (one line that
names the flag or key, checked before anything starts where it can be: see
``kiteq.broker.startup``, also for where the config file is found), 2 on a usage error.

Settings that are also config keys take precedence in this order: flag, then environment
(``KITEQ_ADMIN_SECRET``), then the file. The admin secret has no flag of its own: the
command line of a process is visible to every local user (``ps``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from kiteq.binding.registry import redact_registry_uri
from kiteq.broker.address import split_bind
from kiteq.broker.logs import LOG_FILE, LogFormat, configure as configure_logging
from kiteq.broker.server import Broker
from kiteq.broker.startup import (
    CONFIG_ENV,
    LOCAL_CONFIG,
    check_flags,
    check_http_port,
    check_port_free,
    explain,
    find_config,
    resolve_store_path,
    version,
)
from kiteq.core.admin import ADMIN_SECRET_ENV, AUDIT_LOGGER
from kiteq.core.config import ClusterConfig, load_cluster, read_secret_file
from kiteq.core.errors import KiteQError

logger = logging.getLogger("kiteq.broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiteq",
        description="KiteQ for Python broker",
        allow_abbrev=False,
    )

    def flag(name: str, dest: str, **kwargs: object) -> None:
        # -clusterName, --clusterName and --cluster-name all work
        dashed = "".join(f"-{c.lower()}" if c.isupper() else c for c in name)
        names = [f"-{name}", f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
        parser.add_argument(*names, dest=dest, **kwargs)  # type: ignore[arg-type]

    flag(
        "clusterName",
        "cluster_name",
        default="rocksdb_dev",
        help="[clusters.<name>] to run (default rocksdb_dev)",
    )
    flag(
        "configPath",
        "config_path",
        default=None,
        help=f"cluster TOML (default ${CONFIG_ENV}, else ./{LOCAL_CONFIG}, else the shipped one)",
    )
    flag(
        "bind",
        "bind",
        default="127.0.0.1:13800",
        help="gRPC listen host:port (default 127.0.0.1:13800)",
    )
    flag(
        "pport",
        "pport",
        type=int,
        default=-1,
        help="ops HTTP port for /metrics /stat /binds; 0: one the OS picks; < 0: off",
    )
    flag(
        "hport",
        "hport",
        type=int,
        default=None,
        help="HTTP publish API port (overrides hport); 0: one the OS picks; < 0: off",
    )
    flag(
        "logLevel",
        "log_level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )
    flag(
        "logFormat",
        "log_format",
        type=LogFormat,
        default=LogFormat.TEXT,
        choices=list(LogFormat),
        help="text (default) or json: one JSON object per line",
    )
    flag(
        "logPath",
        "log_path",
        default=None,
        help=f"also write the log to <logPath>/{LOG_FILE} (default: stderr only)",
    )
    flag(
        "grace", "grace", type=float, default=10.0, help="seconds to drain on SIGTERM (default 10)"
    )
    flag("tlsCert", "tls_cert", default=None, help="PEM certificate chain (overrides tlsCert)")
    flag("tlsKey", "tls_key", default=None, help="PEM private key (overrides tlsKey)")
    flag(
        "tlsClientCa",
        "tls_client_ca",
        default=None,
        help="PEM CA bundle that client certificates must be signed by (mTLS)",
    )
    flag(
        "adminSecretFile",
        "admin_secret_file",
        default=None,
        help=f"file whose first line is the admin secret (overrides {ADMIN_SECRET_ENV})",
    )
    parser.add_argument("-version", "--version", action="version", version=f"kiteq {version()}")
    return parser


def apply_overrides(
    config: ClusterConfig, options: argparse.Namespace, environ: Mapping[str, str]
) -> ClusterConfig:
    """*config* with the flags and environment variables that override its keys.

    Raises:
        ConfigError: The ``-adminSecretFile`` cannot be read or is empty.
    """
    secret = config.admin_secret
    if options.admin_secret_file is not None:
        secret = read_secret_file(options.admin_secret_file, "-adminSecretFile")
    elif environ.get(ADMIN_SECRET_ENV, "").strip():
        secret = environ[ADMIN_SECRET_ENV].strip()
    return dataclasses.replace(
        config,
        tls_cert=config.tls_cert if options.tls_cert is None else options.tls_cert,
        tls_key=config.tls_key if options.tls_key is None else options.tls_key,
        tls_client_ca=(
            config.tls_client_ca if options.tls_client_ca is None else options.tls_client_ca
        ),
        admin_secret=secret,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        configure_logging(options.log_level, options.log_format, options.log_path)
    except KiteQError as exc:
        print(f"kiteq: {exc}", file=sys.stderr)
        return 1
    # the audit trail is not chatter: -logLevel=WARNING must not drop admin mutations
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
    faulthandler.register(signal.SIGUSR1)
    cwd = Path.cwd()
    try:
        check_flags(pport=options.pport, grace=options.grace, hport=options.hport)
        options.config_path = find_config(options.config_path, os.environ, cwd)
        config = load_cluster(options.config_path, options.cluster_name)
        config = resolve_store_path(apply_overrides(config, options, os.environ), cwd)
        host, port = split_bind(options.bind)
        check_port_free("-bind", host, port)
        if options.pport > 0:
            check_port_free("-pport", host, options.pport)
        check_http_port(config, options.hport, host, (port, options.pport))
    except KiteQError as exc:
        print(f"kiteq: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(_serve(config, options))
    except KiteQError as exc:
        print(f"kiteq: {explain(exc, config)}", file=sys.stderr)
        return 1


# The broker makes several objects per message and almost none of them form reference
# cycles (refcounting frees them); with the default threshold of 700 allocations the
# cyclic collector ran every few hundred messages and rescanned the long-lived delivery
# state each time: a fifth of the broker's CPU in the pipeline benchmark (38 -> 30 us per
# message with these values). Cycles are still collected, just less often.
_GC_THRESHOLDS: Final = (100_000, 50, 100)


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when installed (part of the server extra), else asyncio."""
    gc.set_threshold(*_GC_THRESHOLDS)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(config: ClusterConfig, options: argparse.Namespace) -> int:
    broker = Broker(
        config, bind=options.bind, pport=options.pport, hport=options.hport, grace=options.grace
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.request_stop)
    try:
        await broker.start()
    except BaseException:
        # a start that failed is no shutdown: the cause is the one line main() prints, so
        # stop() releases what was opened without its "stopping... draining" lines
        with _quiet(logging.getLogger("kiteq")):
            await broker.stop()
        raise
    gc.freeze()  # what start() built lives as long as the process: never rescan it
    print(
        f"kiteq ready cluster={config.name} bind={broker.advertised} store={broker.store_description} "
        f"registry={redact_registry_uri(config.registry)} topics={','.join(config.topics)} "
        f"tls={broker.tls_mode} config={options.config_path}{_listeners(broker)}",
        flush=True,
    )
    try:
        await broker.wait()
    except Exception:
        logger.critical("broker failed", exc_info=True)
        await broker.stop()
        return 1
    await broker.stop()
    return 0


def _listeners(broker: Broker) -> str:
    """The ready line's ``ops=`` and ``http=`` parts: where those that are on listen."""
    parts = (("ops", broker.ops_address), ("http", broker.http_address))
    return "".join(f" {name}={address}" for name, address in parts if address)


@contextlib.contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    """Only warnings and errors from *log* and its children while the block runs."""
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
