"""``kiteq-admin``: ask a broker for stats, groups, backlog, bindings, messages, dead letters.

Examples::

    kiteq-admin stats
    kiteq-admin --json stats                      # for scripts
    kiteq-admin -broker 127.0.0.1:13800 bindings -topic trade
    kiteq-admin groups
    kiteq-admin backlog
    kiteq-admin message 0f3c...e1 -body
    kiteq-admin dlq -topic trade -reason expired
    kiteq-admin redrive -topic trade -group acct-svc --dry-run
    kiteq-admin redrive 0f3c...e1 -group acct-svc
    kiteq-admin scheduled -topic trade             # messages waiting for their delivery time
    kiteq-admin cancel 0f3c...e1                   # never deliver that scheduled message
    KITEQ_ADMIN_SECRET=... kiteq-admin -tlsCa ca.pem -broker broker1:13800 stats

The broker is ``-broker``, else ``$KITEQ_ADMIN_BROKER``, else 127.0.0.1:13800.

Output: aligned tables by default; ``--json`` (before or after the command) prints the
reply as JSON with numbers as numbers and times as ISO 8601 UTC (null when unset).

Exit codes (``EXIT_*``): 0 done; 1 the call failed (unreachable broker, refused secret,
TLS mismatch, bad argument the broker refused); 2 usage error (unknown flag, unknown
``-reason``); 3 not found (``message`` of an id the broker never had, ``cancel`` of an id
not stored); 4 nothing changed (``commit``/``rollback`` of a message that is not
uncommitted, a ``redrive`` that moved or would move nothing, ``cancel`` of a message
that is not scheduled: due already, or uncommitted).

The admin secret comes from ``-secretFile`` (its first line), else ``KITEQ_ADMIN_SECRET``;
``-secret`` also works but puts the secret on the command line, which every local user
can read (``ps``). Any ``-tls*`` flag (or ``-tls``) connects with TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import grpc
from google.protobuf.message import Message

from kiteq.admin import render
from kiteq.core.admin import ADMIN_SECRET_ENV, ADMIN_SECRET_HEADER, DEAD_LETTER_REASONS
from kiteq.core.config import read_secret_file
from kiteq.core.errors import KiteQError
from kiteq.core.tls import PeerTransport, TlsOptions, probe_transport
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc, common_pb2

_PROBE_TIMEOUT = 2.0
DEFAULT_BROKER = "127.0.0.1:13800"
# where the broker is when -broker is not given: set once per shell, not on every command
BROKER_ENV = "KITEQ_ADMIN_BROKER"
# the broker's largest page (kiteq.broker.admin_service.MAX_PAGE)
MAX_LIMIT = 1000


class Exit(enum.IntEnum):
    """The documented exit codes (module docstring)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    UNCHANGED = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiteq-admin",
        allow_abbrev=False,
        epilog="exit codes: 0 done, 1 call failed, 2 usage, 3 not found, 4 nothing changed",
    )
    parser.add_argument(
        "-broker",
        "--broker",
        default=os.environ.get(BROKER_ENV, DEFAULT_BROKER),
        help=f"broker host:port (default ${BROKER_ENV}, else {DEFAULT_BROKER})",
    )
    _json_flag(parser, default=False)
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

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        found = sub.add_parser(name, help=help_text)
        _json_flag(found, default=argparse.SUPPRESS)
        return found

    command("stats", "counters, backlog per topic, groups, dead letters per (topic, group)")
    command("groups", "per group: connections, deliveries in flight, backlog, dead letters")
    command(
        "backlog",
        "per topic: stored messages and dead letters; per (topic, group): backlog, unacked, "
        "oldest message, dead letters",
    )
    bindings = command("bindings", "bindings known to the broker")
    bindings.add_argument("-topic", "--topic", default="")
    message = command("message", "a message's state and history")
    message.add_argument("message_id")
    message.add_argument("-body", "--body", action="store_true", help="include the body")
    tx = command("tx", "list uncommitted (transactional) messages")
    tx.add_argument("-unresolved", "--unresolved", action="store_true", help="only unresolved")
    _limit_flag(tx)
    tx.add_argument("-after", "--after", default="")
    for verb in ("commit", "rollback"):
        resolve = command(verb, f"{verb} an uncommitted message (operator decision)")
        resolve.add_argument("message_id")
    scheduled = command("scheduled", "list scheduled messages, by delivery time")
    scheduled.add_argument("-topic", "--topic", default="")
    _limit_flag(scheduled)
    scheduled.add_argument(
        "-afterTime", "--afterTime", dest="after_time", type=float, default=0.0, help="page on"
    )
    scheduled.add_argument("-after", "--after", default="", help="page on (with -afterTime)")
    cancel = command("cancel", "remove a scheduled message before its delivery time")
    cancel.add_argument("message_id")
    dlq = command("dlq", "list dead letters")
    _filter_flags(dlq)
    _limit_flag(dlq)
    dlq.add_argument("-after", "--after", default="", help="page after this message id")
    dlq.add_argument(
        "-after-group", "--after-group", default="", help="and this group (the reply's nextGroup)"
    )
    redrive = command("redrive", "deliver dead letters again")
    redrive.add_argument(
        "message_ids", nargs="*", help="ids; none: every dead letter the filters match"
    )
    _filter_flags(redrive)
    redrive.add_argument(
        "-all", "--all", action="store_true", help="required to redrive with no filter"
    )
    redrive.add_argument(
        "-dry-run",
        "--dry-run",
        "-dryRun",
        "--dryRun",
        dest="dry_run",
        action="store_true",
        help="count what would move; move nothing",
    )
    webhook = command("webhook", "make a group a webhook consumer of a topic (its bindings)")
    webhook.add_argument("-group", "--group", required=True)
    webhook.add_argument("-topic", "--topic", required=True)
    webhook.add_argument("-url", "--url", required=True, help="inside the broker's webhookAllow")
    webhook.add_argument(
        "-type", "--type", dest="message_type", default="", help="message type or pattern"
    )
    webhook.add_argument(
        "-bindType", "--bindType", dest="bind_type", default="direct", choices=_BIND_TYPES
    )
    webhook.add_argument("-watermark", "--watermark", type=int, default=0, help="calls/s; 0: none")
    webhook.add_argument("-concurrency", "--concurrency", type=int, default=0, help="default 8")
    webhook.add_argument(
        "-callTimeout",
        "--callTimeout",
        dest="call_timeout",
        type=float,
        default=0.0,
        help="seconds a call may take; default 5",
    )
    return parser


_BIND_TYPES: Final = {
    "direct": common_pb2.BIND_TYPE_DIRECT,
    "regx": common_pb2.BIND_TYPE_REGEX,
    "regex": common_pb2.BIND_TYPE_REGEX,
    "fanout": common_pb2.BIND_TYPE_FANOUT,
}


def _webhook_request(options: argparse.Namespace) -> admin_pb2.BindWebhookRequest:
    bind_type = _BIND_TYPES[options.bind_type]
    fanout = bind_type == common_pb2.BIND_TYPE_FANOUT
    return admin_pb2.BindWebhookRequest(
        groupId=options.group,
        bindings=[
            common_pb2.Binding(
                topic=options.topic,
                messageType=options.message_type or ("*" if fanout else ""),
                bindType=bind_type,
                watermark=options.watermark,
                persistent=True,
            )
        ],
        webhook=admin_pb2.Webhook(
            url=options.url,
            concurrency=options.concurrency,
            timeoutSeconds=options.call_timeout,
        ),
    )


def _json_flag(parser: argparse.ArgumentParser, default: object) -> None:
    # on the command too (kiteq-admin stats --json); SUPPRESS keeps the global one's value
    parser.add_argument(
        "-json", "--json", dest="json", action="store_true", default=default, help="print JSON"
    )


def _limit_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-limit", "--limit", type=int, default=100, help=f"page size, 1..{MAX_LIMIT}"
    )


def _filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-topic", "--topic", default="")
    parser.add_argument("-type", "--type", dest="message_type", default="")
    parser.add_argument("-group", "--group", default="", help="only this group's dead letters")
    parser.add_argument(
        "-reason", "--reason", default="", type=_reason, help=", ".join(DEAD_LETTER_REASONS)
    )


def _reason(value: str) -> str:
    # a reason no dead letter has would match nothing: a usage error, not an empty list
    if value and value not in DEAD_LETTER_REASONS:
        raise argparse.ArgumentTypeError(
            f"unknown dead-letter reason {value!r}; known: {', '.join(DEAD_LETTER_REASONS)}"
        )
    return value


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


async def _call(options: argparse.Namespace, secret: str, tls: TlsOptions | None) -> Message:
    try:
        return await _ask(options, secret, tls)
    except grpc.aio.AioRpcError as exc:
        hint = await _hint(options.broker, tls, exc)
        raise _CallFailedError(f"{exc.code().name}: {exc.details()}{hint}") from exc


class _CallFailedError(Exception):
    """The call failed; the message is what to print."""


async def _ask(options: argparse.Namespace, secret: str, tls: TlsOptions | None) -> Message:
    metadata = ((ADMIN_SECRET_HEADER, secret),) if secret else None
    async with _channel(options.broker, tls) as channel:
        rpc, request = _rpc(admin_pb2_grpc.AdminStub(channel), options)
        reply: Message = await rpc(request, metadata=metadata, timeout=options.timeout)
        return reply


_Rpc = Callable[..., Awaitable[Message]]


def _rpc(stub: admin_pb2_grpc.AdminAsyncStub, options: argparse.Namespace) -> tuple[_Rpc, Message]:
    """The call *options.command* makes, and its request."""
    command = options.command
    if command in ("stats", "groups", "backlog"):
        return stub.Stats, admin_pb2.StatsRequest()
    if command == "tx":
        return stub.ListTransactions, admin_pb2.ListTransactionsRequest(
            unresolvedOnly=options.unresolved, limit=options.limit, after=options.after
        )
    if command in ("commit", "rollback"):
        return stub.ResolveTransaction, admin_pb2.ResolveTransactionRequest(
            messageId=options.message_id, commit=command == "commit"
        )
    if command == "scheduled":
        return stub.ListScheduled, admin_pb2.ListScheduledRequest(
            topic=options.topic,
            limit=options.limit,
            afterTime=options.after_time,
            after=options.after,
        )
    if command == "cancel":
        return stub.CancelScheduled, admin_pb2.CancelScheduledRequest(messageId=options.message_id)
    if command == "dlq":
        return stub.ListDeadLetters, admin_pb2.ListDeadLettersRequest(
            filter=_dlq_filter(options),
            limit=options.limit,
            after=options.after,
            afterGroup=options.after_group,
        )
    if command == "redrive":
        return stub.Redrive, admin_pb2.RedriveRequest(
            messageIds=options.message_ids,
            filter=_dlq_filter(options),
            groupId=options.group,
            dryRun=options.dry_run,
        )
    if command == "webhook":
        return stub.BindWebhook, _webhook_request(options)
    if command == "bindings":
        return stub.ListBindings, admin_pb2.ListBindingsRequest(topic=options.topic)
    return stub.GetMessage, admin_pb2.GetMessageRequest(
        messageId=options.message_id, withBody=options.body
    )


def _outcome(options: argparse.Namespace, reply: Message) -> tuple[Exit, str]:
    """The exit code and, when it is not OK, the line that says why."""
    if isinstance(reply, admin_pb2.GetMessageResponse):
        if not reply.found and reply.state == admin_pb2.MESSAGE_STATE_UNKNOWN:
            return Exit.NOT_FOUND, f"message {options.message_id} not found"
    elif isinstance(reply, admin_pb2.ResolveTransactionResponse):
        if not reply.changed:
            return (
                Exit.UNCHANGED,
                f"nothing changed: {options.message_id} is not an uncommitted message "
                "(absent, or decided already)",
            )
    elif isinstance(reply, admin_pb2.CancelScheduledResponse):
        if reply.outcome == admin_pb2.CANCEL_OUTCOME_NOT_FOUND:
            return Exit.NOT_FOUND, f"message {options.message_id} not found"
        if reply.outcome != admin_pb2.CANCEL_OUTCOME_CANCELLED:
            return Exit.UNCHANGED, f"nothing changed: {options.message_id}: {reply.detail}"
    elif isinstance(reply, admin_pb2.RedriveResponse) and reply.redriven == 0:
        return Exit.UNCHANGED, "nothing changed: no dead letter matched"
    return Exit.OK, ""


def _human(options: argparse.Namespace, reply: Message) -> str:
    views: dict[str, Callable[[Message], str]] = {
        "stats": render.stats,  # type: ignore[dict-item]
        "groups": render.groups,  # type: ignore[dict-item]
        "backlog": render.backlog,  # type: ignore[dict-item]
        "bindings": render.bindings,  # type: ignore[dict-item]
        "message": render.message,  # type: ignore[dict-item]
        "dlq": render.dead_letters,  # type: ignore[dict-item]
        "tx": render.transactions,  # type: ignore[dict-item]
        "scheduled": render.scheduled,  # type: ignore[dict-item]
    }
    if isinstance(reply, admin_pb2.RedriveResponse):
        if reply.dryRun:
            return f"would redrive {reply.redriven} dead letters (dry run: nothing moved)"
        return f"redrove {reply.redriven} dead letters"
    if isinstance(reply, admin_pb2.ResolveTransactionResponse):
        return f"{options.command} {options.message_id}: done"
    if isinstance(reply, admin_pb2.CancelScheduledResponse):
        return f"cancelled {options.message_id}: it will not be delivered"
    if isinstance(reply, admin_pb2.BindWebhookResponse):
        return f"group {options.group} calls {options.url} ({reply.bindings} binding)"
    return views[options.command](reply)


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
    if getattr(options, "limit", 1) < 1:
        parser.error(f"-limit must be 1..{MAX_LIMIT}, got {options.limit}")
    if getattr(options, "limit", 1) > MAX_LIMIT:
        # said, not silent: the broker would return at most MAX_LIMIT anyway
        print(
            f"kiteq-admin: -limit {options.limit} capped to {MAX_LIMIT} (the broker's largest "
            "page); page on with -after",
            file=sys.stderr,
        )
        options.limit = MAX_LIMIT
    try:
        secret = admin_secret(options, os.environ)
        tls = tls_options(options)
        reply = asyncio.run(_call(options, secret, tls))
    except (KiteQError, _CallFailedError) as exc:
        print(f"kiteq-admin: {exc}", file=sys.stderr)
        return Exit.FAILED
    code, why = _outcome(options, reply)
    if options.json:
        print(json.dumps(render.to_json(reply), indent=2, sort_keys=True))
    elif code is Exit.OK:
        print(_human(options, reply))
    if why:
        print(f"kiteq-admin: {why}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
