"""The Grafana dashboard ``ops/grafana/dashboards/kiteq-overview.json``, built as code.

Panels and queries are typed builders of Grafana's own ``grafana-foundation-sdk`` (a dev
dependency: only this generator needs it, never the broker). The JSON is committed so that
Grafana provisioning needs no Python; ``python -m kiteq.ops.dashboard`` rewrites it and
``--check`` exits 1 when the committed file differs (the test command runs it, as it does
``proto/generate.py --check``).

Every query filters on ``$job`` and ``$instance`` and uses ``$__rate_interval``; the
dashboard tests evaluate each one against a real Prometheus scraping a broker.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Final

from grafana_foundation_sdk.builders import (
    dashboard as builder,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model, prometheus as prometheus_model

__all__ = ["DASHBOARD_PATH", "build", "render"]

DASHBOARD_PATH: Final = (
    Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "kiteq-overview.json"
)
UID: Final = "kiteq-overview"
_DATASOURCE: Final = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# every query's selector: the broker(s) chosen in the variables
_SEL: Final = 'job=~"$job", instance=~"$instance"'
_TOPIC: Final = f'{_SEL}, topic=~"$topic"'
_RATE: Final = "[$__rate_interval]"


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclasses.dataclass(frozen=True)
class PanelSpec:
    kind: str  # stat, timeseries, table
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 12
    height: int = 8


def _q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(expr, legend),)


def _quantiles(metric: str, by: str, legend: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{_SEL}}}{_RATE})))",
            f"p{round(q * 100)} {legend}",
        )
        for q in (0.5, 0.99)
    )


def _rate(metric: str, selector: str = _SEL) -> str:
    return f"rate({metric}{{{selector}}}{_RATE})"


ROWS: Final[tuple[tuple[str, tuple[PanelSpec, ...]], ...]] = (
    (
        "Overview",
        (
            PanelSpec(
                "stat",
                "Brokers up",
                "Brokers Prometheus scrapes successfully (from `up`, so a dead broker counts 0).",
                "short",
                _q(f"sum(up{{{_SEL}}})"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Brokers down",
                "Scrape targets of the job that do not answer.",
                "short",
                _q(f"count(up{{{_SEL}}} == 0) or vector(0)"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Received",
                "Messages accepted per second.",
                "mps",
                _q(f"sum({_rate('kiteq_messages_received_total', _TOPIC)})"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Acked deliveries",
                "Deliveries acknowledged per second.",
                "mps",
                _q(
                    f"sum({_rate('kiteq_messages_delivered_total', _TOPIC + ', result=' + chr(34) + 'ack' + chr(34))})"
                ),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Backlog",
                "Stored messages not yet delivered to every group.",
                "short",
                _q(f"sum(kiteq_store_backlog_messages{{{_TOPIC}}})"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Unresolved transactions",
                "Uncommitted messages whose checks ran out (an admin decides them).",
                "short",
                _q(f"sum(kiteq_transactions_unresolved{{{_SEL}}})"),
                4,
                4,
            ),
        ),
    ),
    (
        "Messages",
        (
            PanelSpec(
                "timeseries",
                "Received by topic",
                "Messages accepted per second, by topic.",
                "mps",
                _q(
                    f"sum by (topic) ({_rate('kiteq_messages_received_total', _TOPIC)})",
                    "{{topic}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Rejected by reason",
                "Messages refused on arrival per second, by reason.",
                "mps",
                _q(
                    f"sum by (reason) ({_rate('kiteq_messages_rejected_total', _TOPIC)})",
                    "{{reason}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Deliveries by result",
                "Delivery outcomes per second: ack, nack, timeout, disconnected.",
                "mps",
                _q(
                    f"sum by (result) ({_rate('kiteq_messages_delivered_total', _TOPIC)})",
                    "{{result}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Redeliveries by topic and group",
                "Deliveries that were retries, per second.",
                "mps",
                _q(
                    f"sum by (topic, group) ({_rate('kiteq_messages_redelivered_total', _TOPIC)})",
                    "{{topic}} / {{group}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Ack ratio",
                "Share of delivery attempts that were acked.",
                "percentunit",
                _q(
                    f"sum({_rate('kiteq_messages_delivered_total', _TOPIC + ', result=' + chr(34) + 'ack' + chr(34))})"
                    f" / sum({_rate('kiteq_messages_delivered_total', _TOPIC)})",
                    "acked",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Backlog by topic",
                "Stored messages not yet delivered to every group, by topic.",
                "short",
                _q(f"sum by (topic) (kiteq_store_backlog_messages{{{_TOPIC}}})", "{{topic}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Bytes in and out",
                "Body bytes accepted from producers and pushed to consumers, per second.",
                "Bps",
                (
                    Query(f"sum({_rate('kiteq_received_bytes_total', _TOPIC)})", "in"),
                    Query(f"sum({_rate('kiteq_delivered_bytes_total')})", "out (all topics)"),
                ),
                8,
            ),
        ),
    ),
    (
        "Groups",
        (
            PanelSpec(
                "timeseries",
                "Unacked by group",
                "Deliveries pushed to the group and waiting for its ack.",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_unacked_messages{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Waiting by group",
                "Messages held in memory by the group's watermark, credits or the worker limit.",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_waiting_messages{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Oldest waiting message by group",
                "Age since publish of the oldest message waiting or unacked for the group.",
                "s",
                _q(
                    f"max by (topic, group) (kiteq_group_oldest_waiting_age_seconds{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Consumers by group",
                "Open consumer streams of each bound group (0: offline).",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_consumers{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Flow-limited pushes",
                "Pushes held back by the group's watermark per second (they wait, using no attempt).",
                "ops",
                _q(
                    f"sum by (topic, group) ({_rate('kiteq_flow_limited_pushes_total', _TOPIC)})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Deliveries in flight",
                "Deliveries pushed and waiting for an ack, per broker.",
                "short",
                _q(f"sum by (instance) (kiteq_deliver_inflight{{{_SEL}}})", "{{instance}}"),
                8,
            ),
        ),
    ),
    (
        "Latency",
        (
            PanelSpec(
                "timeseries",
                "Publish to store-ack",
                "From a publish batch's arrival to its store-ack (durable).",
                "s",
                _quantiles("kiteq_publish_store_ack_seconds", "topic", "{{topic}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Publish to first delivery",
                "From a message's publish to its first push to a group.",
                "s",
                _quantiles("kiteq_publish_first_delivery_seconds", "group", "{{group}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Delivery to ack",
                "From a push to the consumer's ack (processing time plus the round trip).",
                "s",
                _quantiles("kiteq_delivery_ack_seconds", "group", "{{group}}"),
                8,
            ),
        ),
    ),
    (
        "Dead letters and transactions",
        (
            PanelSpec(
                "timeseries",
                "Dead letters by topic and group",
                "Dead letters in the store, by topic and group.",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_dead_letters{{{_TOPIC}}})",
                    "{{topic}} {{group}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Dead-lettered by reason",
                "Messages moved to the dead-letter queue per second, by group and reason.",
                "ops",
                _q(
                    f"sum by (group, reason) ({_rate('kiteq_dead_lettered_total', _TOPIC)})",
                    "{{group}} {{reason}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Transactions",
                "Uncommitted messages waiting for a decision, and those whose checks ran out.",
                "short",
                (
                    Query(f"sum(kiteq_transactions_pending{{{_SEL}}})", "pending"),
                    Query(f"sum(kiteq_transactions_unresolved{{{_SEL}}})", "unresolved"),
                ),
            ),
            PanelSpec(
                "timeseries",
                "Transaction checks by result",
                "Checks answered commit, rollback or unknown, or ending unresolved, per second.",
                "ops",
                _q(
                    f"sum by (result) ({_rate('kiteq_transaction_checks_total')})",
                    "{{result}}",
                ),
            ),
        ),
    ),
    (
        "Store",
        (
            PanelSpec(
                "timeseries",
                "Store call latency",
                "Duration of message-store calls, by operation.",
                "s",
                _quantiles("kiteq_store_operation_duration_seconds", "op", "{{op}}"),
            ),
            PanelSpec(
                "timeseries",
                "Store batch size (mean)",
                "Messages per store call, by operation.",
                "short",
                _q(
                    f"sum by (op) ({_rate('kiteq_store_batch_size_sum')})"
                    f" / sum by (op) ({_rate('kiteq_store_batch_size_count')})",
                    "{{op}}",
                ),
            ),
        ),
    ),
    (
        "Cluster",
        (
            PanelSpec(
                "timeseries",
                "ZooKeeper session",
                "1 for the state each broker's ZooKeeper session is in (all 0: no ZooKeeper).",
                "short",
                _q(
                    f"max by (instance, state) (kiteq_zookeeper_state{{{_SEL}}})",
                    "{{instance}} {{state}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "ZooKeeper sessions lost and takeovers",
                "Expired ZooKeeper sessions, and dead brokers' backlogs taken over, per second.",
                "ops",
                (
                    Query(
                        f"sum({_rate('kiteq_zookeeper_session_expirations_total')})",
                        "sessions lost",
                    ),
                    Query(f"sum({_rate('kiteq_takeovers_total')})", "takeovers"),
                    Query(f"sum({_rate('kiteq_takeover_messages_total')})", "messages taken over"),
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Sessions closed by reason",
                "Client streams ended per second: client_closed, cancelled, refused, error.",
                "ops",
                _q(
                    f"sum by (reason) ({_rate('kiteq_sessions_closed_total')})",
                    "{{reason}}",
                ),
                8,
            ),
        ),
    ),
    (
        "Process",
        (
            PanelSpec(
                "timeseries",
                "Client connections",
                "Open client streams, by role.",
                "short",
                _q(f"sum by (role) (kiteq_client_connections{{{_SEL}}})", "{{role}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Resident memory",
                "Resident set size of each broker process.",
                "bytes",
                _q(f"process_resident_memory_bytes{{{_SEL}}}", "{{instance}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "CPU",
                "CPU seconds per second of each broker process.",
                "percentunit",
                _q(_rate("process_cpu_seconds_total"), "{{instance}}"),
                8,
            ),
            PanelSpec(
                "table",
                "Brokers",
                "Version, cluster and store of each broker.",
                "short",
                _q(f"kiteq_build_info{{{_SEL}}}"),
                16,
                6,
            ),
            PanelSpec(
                "timeseries",
                "Metric label overflow",
                "Label values folded into _other or _invalid by the cardinality caps.",
                "ops",
                _q(
                    f"sum by (label) ({_rate('kiteq_metrics_label_overflow_total')})",
                    "{{label}}",
                ),
                8,
                6,
            ),
        ),
    ),
    (
        "Security",
        (
            PanelSpec(
                "timeseries",
                "Refused bindings by reason",
                "Binding declarations or registry nodes refused per second (acl or limits).",
                "ops",
                _q(
                    f"sum by (reason) ({_rate('kiteq_bindings_refused_total')})",
                    "{{reason}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Refused client frames by reason",
                "Client frames or items refused before any message, per second.",
                "ops",
                _q(
                    f"sum by (reason) ({_rate('kiteq_rejected_frames_total')})",
                    "{{reason}}",
                ),
            ),
        ),
    ),
)


def _variable(name: str, label: str, query: str, all_value: str = "") -> builder.QueryVariable:
    """A multi-value query variable.

    *all_value* empty: "All" is the list of every value (for job and instance, so that
    "All" never takes in another job's targets).
    """
    variable = (
        builder.QueryVariable(name)
        .label(label)
        .datasource(_DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .multi(True)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    return variable.all_value(all_value) if all_value else variable


def _panel(spec: PanelSpec, panel_id: int) -> Any:
    kinds: dict[str, Any] = {
        "stat": stat.Panel,
        "timeseries": timeseries.Panel,
        "table": table.Panel,
    }
    panel = (
        kinds[spec.kind]()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(_DATASOURCE)
        .unit(spec.unit)
        .span(spec.width)
        .height(spec.height)
    )
    for i, query in enumerate(spec.queries):
        target = (
            prometheus.Dataquery()
            .datasource(_DATASOURCE)
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(chr(ord("A") + i))
        )
        if spec.kind == "table":
            target = target.instant().format(prometheus_model.PromQueryFormat.TABLE)
        panel = panel.with_target(target)
    return panel


def build() -> builder.Dashboard:
    """The dashboard as typed builders."""
    dashboard = (
        builder.Dashboard("KiteQ overview")
        .uid(UID)
        .description(
            "KiteQ brokers: throughput, groups, latency, dead letters, transactions, store, "
            "cluster and process health."
        )
        .tags(["kiteq"])
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("")
        .with_variable(
            builder.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(_variable("job", "Job", "label_values(kiteq_build_info, job)"))
        .with_variable(_variable("instance", "Instance", 'label_values(up{job=~"$job"}, instance)'))
        .with_variable(
            _variable(
                "topic",
                "Topic",
                f"label_values(kiteq_messages_received_total{{{_SEL}}}, topic)",
                ".*",
            )
        )
    )
    panel_id = 0
    for title, specs in ROWS:
        panel_id += 1
        dashboard = dashboard.with_row(builder.Row(title).id(panel_id))
        for spec in specs:
            panel_id += 1
            dashboard = dashboard.with_panel(_panel(spec, panel_id))
    return dashboard


def render() -> str:
    """The dashboard JSON as committed (stable key order, trailing newline)."""
    document: dict[str, Any] = json.loads(JSONEncoder().encode(build().build()))
    # Grafana assigns the numeric id on import; a provisioned file must not carry one
    document["id"] = None
    # the SDK writes no annotation list at all; Grafana's own export has an empty one
    document["annotations"] = document.get("annotations") or {"list": []}
    for panel in document["panels"]:
        # the SDK writes unset panel options as null; Grafana wants them absent
        for key in [k for k, v in panel.items() if v is None]:
            del panel[key]
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiteq.ops.dashboard", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON is not up to date"
    )
    parser.add_argument("--output", type=Path, default=DASHBOARD_PATH)
    options = parser.parse_args(argv)
    text = render()
    if options.check:
        current = options.output.read_text(encoding="utf-8") if options.output.exists() else ""
        if current != text:
            sys.stderr.write(
                f"{options.output} is out of date: run python -m kiteq.ops.dashboard\n"
            )
            return 1
        return 0
    options.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
