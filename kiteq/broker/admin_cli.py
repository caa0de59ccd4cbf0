"""``kiteq-admin``: ask a broker for stats, bindings or one message, as JSON.

Examples::

    kiteq-admin stats
    kiteq-admin -broker 127.0.0.1:13800 bindings -topic trade
    kiteq-admin message 0f3c...e1 -body
    kiteq-admin dlq -topic trade -reason expired
    kiteq-admin redrive -topic trade -group acct-svc
    kiteq-admin redrive 0f3c...e1 -group acct-svc
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import grpc
from google.protobuf.json_format import MessageToDict

from kiteq.broker.admin_service import ADMIN_SECRET_HEADER
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiteq-admin", allow_abbrev=False)
    parser.add_argument("-broker", "--broker", default="127.0.0.1:13800", help="broker host:port")
    parser.add_argument("-secret", "--secret", default="", help="the cluster's adminSecret")
    parser.add_argument("-timeout", "--timeout", type=float, default=5.0, help="seconds")
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


async def _call(options: argparse.Namespace) -> dict[str, object]:
    metadata = ((ADMIN_SECRET_HEADER, options.secret),) if options.secret else None
    async with grpc.aio.insecure_channel(options.broker) as channel:
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
        result = asyncio.run(_call(options))
    except grpc.aio.AioRpcError as exc:
        print(f"kiteq-admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
