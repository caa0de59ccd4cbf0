"""The broker's error codes and the typed error each becomes in the client.

Derived from the one error <-> code table (``kiteq.core.codes.ERROR_FOR_CODE``); both the
wire decoding (``test_wire``) and a producer's send refused by a fake broker
(``test_producer``) check it, and each adds its own case for a code without a type.
"""

from __future__ import annotations

from typing import Final

from kiteq.core.codes import ERROR_FOR_CODE
from kiteq.core.errors import KiteQError

__all__ = ["TYPED_REFUSALS"]

TYPED_REFUSALS: Final[list[tuple[int, type[KiteQError]]]] = [
    (int(code), error) for code, error in ERROR_FOR_CODE.items()
]
