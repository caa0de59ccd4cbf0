"""The dashboard built with ``grafana-foundation-sdk``'s typed builders, and its JSON."""

from __future__ import annotations

import json
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

from kiteq.ops.dashboard.panels import DATASOURCE, ROWS, SELECTOR, PanelSpec

__all__ = ["DASHBOARD_PATH", "UID", "build", "render"]

DASHBOARD_PATH: Final = (
    Path(__file__).resolve().parents[3] / "grafana" / "dashboards" / "kiteq-overview.json"
)
UID: Final = "kiteq-overview"


def _variable(name: str, label: str, query: str, all_value: str = "") -> builder.QueryVariable:
    """A multi-value query variable.

    *all_value* empty: "All" is the list of every value (for job and instance, so that
    "All" never takes in another job's targets).
    """
    variable = (
        builder.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
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
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .span(spec.width)
        .height(spec.height)
    )
    for i, query in enumerate(spec.queries):
        target = (
            prometheus.Dataquery()
            .datasource(DATASOURCE)
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
                f"label_values(kiteq_messages_received_total{{{SELECTOR}}}, topic)",
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
