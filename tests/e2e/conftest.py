from __future__ import annotations

# the fixtures live in a module of their own so that tests/broker's conftest shares them
from tests.e2e.fixtures import broker, launch, mysql_url, start_broker, zk_config

__all__ = ["broker", "launch", "mysql_url", "start_broker", "zk_config"]
