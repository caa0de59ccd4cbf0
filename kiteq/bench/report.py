"""The bench's text report."""

from __future__ import annotations

from kiteq.bench.histogram import Percentiles
from kiteq.bench.target import KiteqRun

__all__ = ["text_report"]


def _latency_row(name: str, p: Percentiles) -> str:
    return f"  {name:<20} {p.p50:>8.3f} {p.p99:>8.3f} {p.p999:>8.3f} {p.max:>9.3f} {p.count:>10,}"


def text_report(run: KiteqRun) -> str:
    r = run.result
    w = r.workload
    where = f"store {run.store} (own broker {run.target})" if run.store else f"broker {run.target}"
    shape = f"{w.producers} producer(s) x {w.consumers} consumer(s)"
    amount = f"{w.count:,} messages" if w.count else f"{w.duration:g} s"
    rate = f", target {w.rate:,.0f} msg/s" if w.rate else ""
    tx = f", {w.tx_share:.0%} transactional" if w.tx_share else ""
    cpu_parts = []
    if r.broker_cpu_us_per_message is not None:
        cpu_parts.append(f"broker {r.broker_cpu_us_per_message}")
    if r.acked:
        cpu_parts.append(f"producers {r.producer_cpu_seconds / r.acked * 1e6:.1f}")
    if r.unique:
        cpu_parts.append(f"consumers {r.consumer_cpu_seconds / r.unique * 1e6:.1f}")
    lines = [
        f"kiteq-bench: {shape}, {amount} of {w.size} B, {w.publish.value}{rate}{tx}; {where}",
        f"publish     {r.publish_rate:>10,.0f} msg/s  ({r.acked:,} acked of {r.sent:,} sent, "
        f"{r.failed:,} failed, {r.publish_seconds:.2f} s)",
    ]
    if w.consumers:
        lines.append(
            f"end to end  {r.e2e_rate:>10,.0f} msg/s  ({r.unique:,} distinct received, "
            f"{r.duplicates:,} duplicates, {r.lost:,} acked but not received, {r.e2e_seconds:.2f} s)"
        )
    lines += [
        f"  {'latency (ms)':<20} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>9} {'count':>10}",
        _latency_row("publish->store-ack", r.store_ack),
    ]
    if w.consumers:
        lines.append(_latency_row("publish->delivery", r.delivery))
    if cpu_parts:
        lines.append("cpu us/msg  " + "  ".join(cpu_parts))
    if r.errors:
        lines.append("errors      " + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())))
    return "\n".join(lines)
