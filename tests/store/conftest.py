"""Store fixtures: one ``store`` fixture parametrised over every backend, so the contract
tests in ``test_contract.py`` run against each of them.

Adding a backend (issue #6: "mysql") means adding its name to ``BACKENDS`` and a branch
in ``backend`` that builds its URL (or calls ``unavailable`` when its server is absent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest

from kiteq.store.base import MessageStore
from tests.store.helpers import Backend

BACKENDS: Final = ["memory", "rocksdb"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    match name:
        case "memory":
            return Backend(name, "memory://?maxcap=100000")
        case "rocksdb":
            return Backend(name, f"rocksdb://{tmp_path / 'db'}?fsync=batch")
        case _:
            raise AssertionError(f"no URL for backend {name}")


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[MessageStore]:
    opened = backend.build()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
