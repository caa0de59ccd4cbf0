"""``kiteq-admin``: the operator's command line, a gRPC client of the broker's Admin service.

It runs from the client-only install (``pip install kiteq``): it imports only
``kiteq.core``, ``kiteq.proto``, grpc and protobuf, never the broker side
(tests/test_layering.py and tests/test_packaging.py hold it to that).
"""
