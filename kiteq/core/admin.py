"""Admin authentication shared by the gRPC admin service and the ops HTTP pages.

One check (``secret_matches``) and one audit logger (``kiteq.audit``): every admin
mutation and every failed admin authentication is one line there, with the peer, so an
operator can route that logger to its own file or alerting.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Final

__all__ = [
    "ADMIN_SECRET_ENV",
    "ADMIN_SECRET_HEADER",
    "AUDIT_LOGGER",
    "DEAD_LETTER_REASONS",
    "audit",
    "secret_matches",
]

AUDIT_LOGGER: Final = "kiteq.audit"
# read by the kiteq and kiteq-admin commands (not at import): keeps the secret out of ps
ADMIN_SECRET_ENV: Final = "KITEQ_ADMIN_SECRET"  # noqa: S105 - a variable name
# gRPC metadata key of the admin secret; here, not in the servicer, because kiteq-admin
# (a client-only command) sends it
ADMIN_SECRET_HEADER: Final = "x-kiteq-admin-secret"  # noqa: S105 - a header name
# why a message leaves delivery for a group (kiteq.handler.dispatch): the only values a
# dead-letter filter can match, so any other is refused rather than matching nothing
DEAD_LETTER_REASONS: Final = ("expired", "deliver_limit", "no_binding")

audit: Final = logging.getLogger(AUDIT_LOGGER)


def secret_matches(given: str | bytes, expected: str) -> bool:
    """Constant-time check of *given* against *expected* (a non-empty secret).

    Both sides are hashed first, so the time taken does not depend on where they differ
    nor on their lengths.
    """
    if not expected:
        return False
    raw = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(
        hashlib.sha256(raw).digest(), hashlib.sha256(expected.encode()).digest()
    )
