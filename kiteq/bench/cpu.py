"""CPU time of this process, of its threads and of another process (Linux ``/proc``)."""

from __future__ import annotations

import os
import resource
import threading

__all__ = ["cpu_seconds", "process_cpu", "thread_cpu", "thread_delta"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stat_cpu(path: str) -> float:
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat; the split starts at field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process *pid*, or None where /proc cannot tell."""
    try:
        return _stat_cpu(f"/proc/{pid}/stat")
    except (OSError, IndexError, ValueError):
        return None


def thread_cpu() -> dict[str, float]:
    """CPU seconds per live thread name (Linux; empty elsewhere): where the time goes."""
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    result: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return result
    for tid in tasks:
        try:
            seconds = _stat_cpu(f"/proc/self/task/{tid}/stat")
            with open(f"/proc/self/task/{tid}/comm") as comm:
                name = names.get(tid) or comm.read().strip()
        except OSError:
            continue
        result[name] = result.get(name, 0.0) + seconds
    return result


def thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after}
