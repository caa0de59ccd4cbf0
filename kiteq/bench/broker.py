"""A broker process of the bench's own: a temporary cluster on a loopback port.

``kiteq`` runs as ``python -m kiteq`` with a generated cluster file (embedded registry
unless told otherwise, any secret accepted) in a temporary directory that also holds the RocksDB files. A MySQL
store gets fresh databases (``kqbench_<random>_<n>``, created by the broker with
``autoCreate=true``) that are dropped when the broker stops.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Final, Self

from kiteq.bench.cpu import process_cpu
from kiteq.bench.process import KiteqProcess
from kiteq.core.errors import ConfigError, KiteQError

__all__ = ["STORES", "OwnBroker", "store_url"]

# store name -> (label, URL template); {dir} is the broker's temporary directory
STORES: Final = {
    "rocksdb": ("rocksdb fsync=batch", "rocksdb://{dir}/db?fsync=batch"),
    "rocksdb-never": ("rocksdb fsync=never", "rocksdb://{dir}/db?fsync=never"),
    "memory": ("memory", "memory://?maxcap=5000000"),
    "mysql": ("mysql", "mysql://root@127.0.0.1:3306?shardnum=4"),
}


def store_url(store: str, directory: Path) -> tuple[str, str]:
    """(label, db URL) for *store*: a name of ``STORES`` or a store URL.

    A ``mysql://`` URL gets a fresh ``db=`` prefix and ``autoCreate=true``.

    Raises:
        ConfigError: *store* is neither.
    """
    if store in STORES:
        label, template = STORES[store]
        url = template.format(dir=directory)
    elif "://" in store:
        label, url = store.split("://", 1)[0], store
    else:
        raise ConfigError(f"unknown store {store!r}: one of {', '.join(STORES)} or a store URL")
    if url.startswith("mysql://"):
        separator = "&" if "?" in url else "?"
        url = f"{url}{separator}db=kqbench_{secrets.token_hex(6)}&autoCreate=true"
    return label, url


class OwnBroker:
    """A ``kiteq`` process on 127.0.0.1 and a port the OS picks; a context manager."""

    def __init__(
        self, store: str, *, registry: str = "embedded://", extra_config: str = ""
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kiteq-bench-")
        directory = Path(self._tmp.name)
        self.store_label, self.db = store_url(store, directory)
        config = directory / "cluster.toml"
        config.write_text(
            "[registry.local]\n"
            f'hosts = "{registry}"\n'
            "[clusters.bench]\n"
            'env = "local"\n'
            f'db = "{self.db}"\n'
            "acceptAnySecret = true\n"
            # a delivery waits in the consumer's queue under load: no retry storm from that
            "deliverySeconds = 30\n"
            f"{extra_config}"
        )
        args = [
            "-clusterName=bench",
            f"-configPath={config}",
            "-bind=127.0.0.1:0",
            "-logLevel=WARNING",
            "-grace=5",
        ]
        self._process = KiteqProcess(args, cwd=directory)

    @property
    def address(self) -> str:
        return self._process.address

    @property
    def pid(self) -> int:
        return self._process.pid

    def cpu_seconds(self) -> float | None:
        return process_cpu(self.pid)

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker and wait for its ready line.

        Raises:
            KiteQError: It exited or did not get ready within *timeout*.
        """
        try:
            self._process.start(timeout)
        except KiteQError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; drop its MySQL databases; remove its files."""
        try:
            self._process.stop()
            if self.db.startswith("mysql://"):
                from kiteq.bench._mysql import drop_databases  # the server extra's PyMySQL

                drop_databases(self.db)
        finally:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
