"""Transitional: takeover nodes on a session of their own, for ``kiteq.broker.server``.

``server.py`` still builds ``ZkTakeoverNodes(parse_zk_uri(config.registry))``; once it takes
``registry.takeover_nodes()`` (the registry's session) instead, delete this module.
"""

from __future__ import annotations

from kiteq.binding import zk_takeover
from kiteq.binding.zk_session import ZkSession
from kiteq.binding.zk_uri import ZkSettings

__all__ = ["ZkTakeoverNodes"]


class ZkTakeoverNodes(zk_takeover.ZkTakeoverNodes):
    """``zk_takeover.ZkTakeoverNodes`` that opens (``start``) and closes (``stop``) its session."""

    def __init__(self, settings: ZkSettings, *, connect_timeout: float = 15.0) -> None:
        super().__init__(ZkSession(settings, connect_timeout=connect_timeout))

    async def start(self) -> None:
        await self._session.open()
        await super().start()

    async def stop(self) -> None:
        await self._session.close()  # a held lock goes with the session
