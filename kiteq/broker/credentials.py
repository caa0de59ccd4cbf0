"""The one check of a client's group and secret, for every transport (gRPC and HTTP).

A session's ``Open``, a unary ``Publish`` and an HTTP publish request all name a group and
its secret; each is accepted only if the group is a valid name and the secret is that
group's (``ClusterConfig.check_secret``: constant time, ``acceptAnySecret`` for groups
without one). The caller answers a refusal in its own protocol and counts it as the
``Rejection`` returned.
"""

from __future__ import annotations

from kiteq.broker.rejections import Rejection
from kiteq.core.config import ClusterConfig
from kiteq.core.limits import MAX_SECRET_BYTES, is_name

__all__ = ["check_credentials"]


def check_credentials(config: ClusterConfig, group: str, secret: str) -> Rejection | None:
    """None when *secret* is *group*'s; else why not.

    ``INVALID_OPEN``: *group* is not a valid group name; ``UNAUTHENTICATED``: the secret is
    wrong, missing or longer than any secret can be.
    """
    if not is_name(group):
        return Rejection.INVALID_OPEN
    if len(secret) > MAX_SECRET_BYTES or not config.check_secret(group, secret):
        return Rejection.UNAUTHENTICATED
    return None
