"""``kiteq-admin``: ask a broker for stats, bindings or one message, as JSON.

Examples::

    kiteq-admin stats
    kiteq-admin -broker 127.0.0.1:13800 bindings -topic trade
    kiteq-admin message 0f3c...e1 -body
    kiteq-admin dlq -topic trade -reason expired
    kiteq-admin redrive -topic trade -group acct-svc
    kiteq-admin redrive 0f3c...e1 -group acct-svc
    KITEQ_ADMIN_SECRET=... kiteq-admin -tlsCa ca.pem -broker broker1:13800 stats

The admin secret comes from ``-secretFile`` (its first line), else ``KITEQ_ADMIN_SECRET``;
``-secret`` also works but puts the secret on the command line, which every local user
can read (``ps``). Any ``-tls*`` flag (or ``-tls``) connects with TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from kiteq.broker.admin_service import ADMIN_SECRET_HEADER
from kiteq.core.admin import ADMIN_SECRET_ENV
from kiteq.core.config import read_secret_file
from kiteq.core.errors import KiteQError
from kiteq.core.tls import PeerTransport, TlsOptions, probe_transport
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc

_PROBE_TIMEOUT = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiteq-admin", allow_abbrev=False)
    parser.add_argument("-broker", "--broker", default="127.0.0.1:13800", help="broker host:port")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "-secret", "--secret", default="", help="the admin secret (visible in ps: prefer below)"
    )
    secret.add_argument(
        "-secretFile",
        "--secretFile",
        "--secret-file",
        dest="secret_file",
        default=None,
        help=f"file whose first line is the admin secret (default: ${ADMIN_SECRET_ENV})",
    )
    parser.add_argument("-timeout", "--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument(
        "-tls", "--tls", action="store_true", help="TLS with the system's trusted roots"
    )
    parser.add_argument("-tlsCa", "--tlsCa", dest="tls_ca", default=None, help="PEM CA bundle")
    parser.add_argument(
        "-tlsCert", "--tlsCert", dest="tls_cert", default=None, help="PEM client certificate"
    )
    parser.add_argument("-tlsKey", "--tlsKey", dest="tls_key", default=None, help="PEM key")
    parser.add_argument(
        "-tlsServerName",
        "--tlsServerName",
        dest="tls_server_name",
        default=None,
        help="name the broker's certificate carries, when not the host dialled",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="counters, backlog per topic, connections per group")
    bindings = sub.add_parser("bindings", help="bindings known to the broker")
    bindings.add_argument("-topic", "--topic", default="")
    message = sub.add_parser("message", help="a message's state and history")
    message.add_argument("message_id")
    message.add_argument("-body", "--body", action="store_true", help="include the body")
    tx = sub.add_parser("tx", help="list uncommitted (transactional) messages")
    tx.add_argument("-unresolved", "--unresolved", action="store_true", help="only unresolved")
    tx.add_argument("-limit", "--limit", type=int, default=100)
    tx.add_argument("-after", "--after", default="")
    for verb in ("commit", "rollback"):
        resolve = sub.add_parser(verb, help=f"{verb} an uncommitted message (operator decision)")
        resolve.add_argument("message_id")
    dlq = sub.add_parser("dlq", help="list dead letters")
    _filter_flags(dlq)
    dlq.add_argument("-limit", "--limit", type=int, default=100)
    dlq.add_argument("-after", "--after", default="", help="page after this message id")
    dlq.add_argument(
        "-after-group", "--after-group", default="", help="and this group (the reply's nextGroup)"
    )
    redrive = sub.add_parser("redrive", help="deliver dead letters again")
    redrive.add_argument(
        "message_ids", nargs="*", help="ids; none: every dead letter the filters match"
    )
    _filter_flags(redrive)
    redrive.add_argument(
        "-all", "--all", action="store_true", help="required to redrive with no filter"
    )
    return parser


def _filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-topic", "--topic", default="")
    parser.add_argument("-type", "--type", dest="message_type", default="")
    parser.add_argument("-group", "--group", default="", help="only this group's dead letters")
    parser.add_argument(
        "-reason", "--reason", default="", help="expired, deliver_limit, no_binding"
    )


def _dlq_filter(options: argparse.Namespace) -> admin_pb2.DeadLetterFilter:
    return admin_pb2.DeadLetterFilter(
        topic=options.topic,
        messageType=options.message_type,
        groupId=options.group,
        reason=options.reason,
    )


def admin_secret(options: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The secret to send: ``-secret``, ``-secretFile``, else ``KITEQ_ADMIN_SECRET``.

    Raises:
        ConfigError: The ``-secretFile`` cannot be read or is empty.
    """
    if options.secret:
        return str(options.secret)
    if options.secret_file is not None:
        return read_secret_file(options.secret_file, "-secretFile")
    return environ.get(ADMIN_SECRET_ENV, "").strip()


def tls_options(options: argparse.Namespace) -> TlsOptions | None:
    """The TLS settings of the flags; None: plaintext."""
    paths = (options.tls_ca, options.tls_cert, options.tls_key)
    if not options.tls and all(p is None for p in (*paths, options.tls_server_name)):
        return None
    return TlsOptions(
        ca=Path(options.tls_ca) if options.tls_ca else None,
        cert=Path(options.tls_cert) if options.tls_cert else None,
        key=Path(options.tls_key) if options.tls_key else None,
        server_name=options.tls_server_name,
    )


def _channel(address: str, tls: TlsOptions | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    material = tls.load("-tls")
    credentials = grpc.ssl_channel_credentials(material.ca, material.key, material.cert)
    override = (
        (("grpc.ssl_target_name_override", material.server_name),) if material.server_name else ()
    )
    return grpc.aio.secure_channel(address, credentials, options=override)


async def _hint(address: str, tls: TlsOptions | None, exc: grpc.aio.AioRpcError) -> str:
    """What to change when the call failed for a reason the status alone does not say."""
    code = exc.code()
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return f" (give -secretFile or set {ADMIN_SECRET_ENV})"
    if code is not grpc.StatusCode.UNAVAILABLE:
        return ""
    if "handshake" in (exc.details() or "").lower():
        return " (TLS handshake failed: check -tlsCa, -tlsServerName, or is the port plaintext?)"
    found = await probe_transport(address, _PROBE_TIMEOUT)
    if tls is None and found in (PeerTransport.TLS, PeerTransport.TLS_CLIENT_CERT):
        return " (the broker serves TLS: add -tlsCa, and -tlsCert/-tlsKey for mTLS)"
    if tls is not None and found is PeerTransport.TLS_CLIENT_CERT:
        return " (the broker requires a client certificate it trusts: -tlsCert and -tlsKey)"
    return ""


async def _call(
    options: argparse.Namespace, secret: str, tls: TlsOptions | None
) -> dict[str, object]:
    try:
        return await _ask(options, secret, tls)
    except grpc.aio.AioRpcError as exc:
        hint = await _hint(options.broker, tls, exc)
        raise _CallFailedError(f"{exc.code().name}: {exc.details()}{hint}") from exc


class _CallFailedError(Exception):
    """The call failed; the message is what to print."""


async def _ask(
    options: argparse.Namespace, secret: str, tls: TlsOptions | None
) -> dict[str, object]:
    metadata = ((ADMIN_SECRET_HEADER, secret),) if secret else None
    async with _channel(options.broker, tls) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        timeout = options.timeout
        if options.command == "stats":
            reply: object = await stub.Stats(
                admin_pb2.StatsRequest(), metadata=metadata, timeout=timeout
            )
        elif options.command == "tx":
            reply = await stub.ListTransactions(
                admin_pb2.ListTransactionsRequest(
                    unresolvedOnly=options.unresolved, limit=options.limit, after=options.after
                ),
                metadata=metadata,
                timeout=timeout,
            )
        elif options.command in ("commit", "rollback"):
            reply = await stub.ResolveTransaction(
                admin_pb2.ResolveTransactionRequest(
                    messageId=options.message_id, commit=options.command == "commit"
                ),
                metadata=metadata,
                timeout=timeout,
            )
        elif options.command == "dlq":
            reply = await stub.ListDeadLetters(
                admin_pb2.ListDeadLettersRequest(
                    filter=_dlq_filter(options),
                    limit=options.limit,
                    after=options.after,
                    afterGroup=options.after_group,
                ),
                metadata=metadata,
                timeout=timeout,
            )
        elif options.command == "redrive":
            reply = await stub.Redrive(
                admin_pb2.RedriveRequest(
                    messageIds=options.message_ids,
                    filter=_dlq_filter(options),
                    groupId=options.group,
                ),
                metadata=metadata,
                timeout=timeout,
            )
        elif options.command == "bindings":
            reply = await stub.ListBindings(
                admin_pb2.ListBindingsRequest(topic=options.topic),
                metadata=metadata,
                timeout=timeout,
            )
        else:
            reply = await stub.GetMessage(
                admin_pb2.GetMessageRequest(messageId=options.message_id, withBody=options.body),
                metadata=metadata,
                timeout=timeout,
            )
    return MessageToDict(reply, always_print_fields_with_no_presence=True)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if (
        options.command == "redrive"
        and not options.message_ids
        and not any((options.topic, options.message_type, options.group, options.reason))
        and not options.all
    ):
        parser.error("redrive with no ids and no filter redrives every dead letter: add -all")
    try:
        secret = admin_secret(options, os.environ)
        tls = tls_options(options)
        result = asyncio.run(_call(options, secret, tls))
    except (KiteQError, _CallFailedError) as exc:
        print(f"kiteq-admin: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
