"""Transitional: the names ``kiteq.client`` imports from here now live in ``zk_session``.

Delete this module once ``kiteq.client._zk_directory`` uses ``kiteq.binding.zk_session``.
"""

from __future__ import annotations

from kiteq.binding.zk_session import KAZOO_LOGGER, digest_acl, new_client

__all__ = ["KAZOO_LOGGER", "digest_acl", "new_client"]
