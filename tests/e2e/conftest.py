from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.broker_process import BrokerProcess, write_config


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real broker process on RocksDB (fsync=batch) in a temporary directory."""
    config = write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch")
    process = BrokerProcess(config)
    process.start()
    yield process
    process.stop_quietly()
