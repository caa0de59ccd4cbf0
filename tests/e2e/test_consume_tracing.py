"""Trace context across a real broker process (issue #17): with OpenTelemetry, one trace
links the producer span and the consumer span through the message; without it, nothing is
imported and messages carry no trace context."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.e2e.broker_process import REPO, BrokerProcess

pytestmark = pytest.mark.e2e

# A tracer provider is process-wide and set once: the traced run has its own interpreter,
# so the other tests' messages stay untraced.
_TRACED = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from kiteq.client import AsyncConsumer, AsyncProducer, Binding, Message

spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)


async def main(address):
    got = []
    arrived = asyncio.Event()

    async def handle(msg):
        got.append(msg)
        arrived.set()
        return True

    async with (
        AsyncConsumer(brokers=[address], group_id="acct-svc",
                      bindings=[Binding.direct("trade", "pay-succ")], handler=handle),
        AsyncProducer(brokers=[address], group_id="pay-svc") as p,
    ):
        sent = await p.send(Message(topic="trade", message_type="pay-succ", body=b"traced"))
        await asyncio.wait_for(arrived.wait(), 20)
    rows = [
        {
            "name": s.name,
            "kind": s.kind.name,
            "trace": s.context.trace_id,
            "span": s.context.span_id,
            "parent": s.parent.span_id if s.parent else None,
        }
        for s in spans.get_finished_spans()
        if (s.attributes or {}).get("messaging.message.id") == sent.message_id
    ]
    print(json.dumps({"properties": dict(got[0].properties), "spans": rows}))


asyncio.run(main(sys.argv[1]))
"""


def test_one_trace_links_the_producer_and_the_consumer_span(broker: BrokerProcess) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _TRACED, broker.address],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert "traceparent" in result["properties"]
    spans = {(s["kind"], s["name"]): s for s in result["spans"]}
    assert sorted(spans) == [("CONSUMER", "trade process"), ("PRODUCER", "trade publish")]
    sender, handler = spans["PRODUCER", "trade publish"], spans["CONSUMER", "trade process"]
    assert handler["trace"] == sender["trace"]
    assert handler["parent"] == sender["span"]
    # the carried context is the producer span's
    assert result["properties"]["traceparent"].split("-")[2] == f"{sender['span']:016x}"


def test_import_kiteq_client_does_not_import_opentelemetry() -> None:
    script = (
        "import sys, kiteq.client; print(sorted(m for m in sys.modules if 'opentelemetry' in m))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_without_opentelemetry_messages_flow_untraced(broker: BrokerProcess) -> None:
    # opentelemetry hidden from the interpreter, as if the extra were not installed
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys, threading

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Hide())
        from kiteq.client import Binding, Consumer, Message, Producer

        got = []
        done = threading.Event()

        def handle(msg):
            got.append(msg)
            done.set()

        with Consumer(brokers=["{broker.address}"], group_id="acct-svc",
                      bindings=[Binding.direct("trade", "pay-succ")], handler=handle):
            with Producer(brokers=["{broker.address}"], group_id="pay-svc") as p:
                p.send(Message(topic="trade", message_type="pay-succ", body=b"plain"))
            assert done.wait(20)
        print(dict(got[0].properties), [m for m in sys.modules if "opentelemetry" in m])
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{} []"
