"""Fixtures for the client tests: an in-process fake broker, async or on its own thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.client._fake_broker import FakeBroker, ThreadedBroker


@pytest.fixture
async def broker() -> AsyncIterator[FakeBroker]:
    """A fake broker on the test's event loop."""
    async with FakeBroker() as server:
        yield server


@pytest.fixture
def threaded_broker() -> Iterator[ThreadedBroker]:
    """A fake broker on its own loop thread, for tests of the blocking facades."""
    server = ThreadedBroker()
    try:
        yield server
    finally:
        server.close()
