"""Message stores: where the broker keeps messages between accept and final ack.

``base`` holds the ``MessageStore`` protocol, ``memory`` and ``rocksdb`` the backends, and
``url.open_store`` picks one from the cluster's ``db`` URL. Backends are imported from their own modules so the client never loads rocksdict.
"""

from __future__ import annotations
