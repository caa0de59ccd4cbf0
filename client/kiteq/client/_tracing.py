"""W3C trace context on messages, through OpenTelemetry when the ``otel`` extra is installed.

A send starts a PRODUCER span (``{topic} publish``) and carries its context in the
message's ``traceparent`` (and ``tracestate``) properties; a handler call runs in a
CONSUMER span (``{topic} process``) whose parent is that context, so one trace follows the
message across services. A batch handler's span links every message's context; an
iterated delivery gets a short ``{topic} receive`` span. A message that already carries a
``traceparent`` is sent as it is (the caller propagates its own context).

OpenTelemetry is the edge library of this module only, imported on the first message
(never by ``import kiteq.client``), and only when it is installed
(``pip install "kiteq[otel]"``); without it every function here costs one check. Spans
go to whatever tracer provider the application configured (none: OpenTelemetry's no-op).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Final

from kiteq.core.message import Message, ReceivedMessage

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = ["TRACEPARENT", "consuming", "consuming_batch", "publishing", "received"]

TRACEPARENT: Final = "traceparent"
_SYSTEM: Final = "kiteq"


class _Otel:
    """The OpenTelemetry pieces this module uses, imported once."""

    def __init__(self) -> None:
        from opentelemetry import propagate, trace

        self.propagate = propagate
        self.trace = trace
        self.kind = trace.SpanKind

    def tracer(self) -> Tracer | None:
        """The client's tracer, or None while no SDK provider is set.

        Asked each time: the application may set its provider after the first message.
        Without one, every span would be a non-recording no-op that carries no context,
        yet building it per message doubled a consumer's CPU (API installed, SDK unset).
        """
        trace = self.trace
        provider = trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None
        tracer: Tracer = provider.get_tracer("kiteq.client")
        return tracer


_otel: _Otel | None = None
_NOTHING: Final = contextlib.nullcontext()
_probed = False


def _get() -> _Otel | None:
    global _otel, _probed  # a lazy, process-wide import
    if not _probed:
        _probed = True
        try:
            if importlib.util.find_spec("opentelemetry") is not None:
                _otel = _Otel()
        except ImportError:  # a partial install: no tracing rather than a failing send
            _otel = None
    return _otel


def _attributes(message: Message, operation: str) -> dict[str, str]:
    return {
        "messaging.system": _SYSTEM,
        "messaging.destination.name": message.topic,
        "messaging.operation.type": operation,
        "messaging.message.id": message.message_id,
        "kiteq.message_type": message.message_type,
    }


def publishing(message: Message) -> Message:
    """*message* with the context of a new PRODUCER span in its properties (a copy)."""
    otel = _get()
    if otel is None or TRACEPARENT in message.properties:
        return message
    tracer = otel.tracer()
    if tracer is None:
        return message
    carrier = dict(message.properties)
    with tracer.start_as_current_span(
        f"{message.topic} publish",
        kind=otel.kind.PRODUCER,
        attributes=_attributes(message, "send"),
    ):
        otel.propagate.inject(carrier)
    if TRACEPARENT not in carrier:  # a no-op propagator: nothing to carry
        return message
    return dataclasses.replace(message, properties=carrier)


def consuming(message: ReceivedMessage) -> AbstractContextManager[object]:
    """A CONSUMER span around a handler call, child of the message's context."""
    otel = _get()
    tracer = None if otel is None else otel.tracer()
    if otel is None or tracer is None:
        return _NOTHING  # the common case: no generator per message
    return _consuming(otel, tracer, message)


@contextlib.contextmanager
def _consuming(otel: _Otel, tracer: Tracer, message: ReceivedMessage) -> Iterator[None]:
    parent = otel.propagate.extract(dict(message.properties))
    with tracer.start_as_current_span(
        f"{message.topic} process",
        context=parent,
        kind=otel.kind.CONSUMER,
        attributes=_attributes(message, "process"),
    ):
        yield


@contextlib.contextmanager
def consuming_batch(messages: Sequence[ReceivedMessage]) -> Iterator[None]:
    """A CONSUMER span around a batch handler call, linking every message's context."""
    otel = _get()
    tracer = None if otel is None else otel.tracer()
    if otel is None or tracer is None or not messages:
        yield
        return
    trace = otel.trace
    links = []
    for message in messages:
        context = otel.propagate.extract(dict(message.properties))
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    first = messages[0]
    with tracer.start_as_current_span(
        f"{first.topic} process",
        kind=otel.kind.CONSUMER,
        links=links,
        attributes={
            "messaging.system": _SYSTEM,
            "messaging.destination.name": first.topic,
            "messaging.operation.type": "process",
            "messaging.batch.message_count": len(messages),
        },
    ):
        yield


def received(message: ReceivedMessage) -> None:
    """A short CONSUMER span for a delivery handed to iterating code."""
    otel = _get()
    tracer = None if otel is None else otel.tracer()
    if otel is None or tracer is None:
        return
    parent = otel.propagate.extract(dict(message.properties))
    span = tracer.start_span(
        f"{message.topic} receive",
        context=parent,
        kind=otel.kind.CONSUMER,
        attributes=_attributes(message, "receive"),
    )
    span.end()
