"""Sampling the server from /proc: its process tree, CPU time and memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import now_ns

__all__ = ["CLK_TCK", "process_tree", "server_sample"]

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (pre-forked workers, forked children), from /proc.

    Every /proc/N/stat is read for its parent pid: /proc/PID/task/TID/children
    would be cheaper but misses children of a busy process.
    """
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split(None, 2)[1])
        kids.setdefault(ppid, []).append(int(entry))
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(kids.get(tree[i], ()))
        i += 1
    return tree


def _live_threads_cpu(pid: int) -> float:
    """CPU seconds of a process's live threads from schedstat (nanoseconds). /proc/PID/stat
    counts in clock ticks and lags behind for processes that run in short bursts (a forked
    child per connection), so the larger of the two is used."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return 0.0
    return total / 1e9


def server_sample(pid: int) -> dict[str, Any] | None:
    """CPU seconds (own and reaped children's) and RSS of a process tree.

    A process's own CPU is the larger of utime+stime (/proc/PID/stat, which
    includes ended threads) and its live threads' schedstat run time; reaped
    children add cutime+cstime. Returns ``{"cpu": s, "rss": bytes, "hwm": bytes,
    "processes": n, "t": ns}`` summed over the tree, or None if ``pid`` is gone.
    Pages shared between processes count once per process.
    """
    cpu = 0.0
    rss = hwm = 0
    processes = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            if p == pid:
                return None
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime, ended threads included
        cpu += max(ticks / CLK_TCK, _live_threads_cpu(p))
        cpu += (int(fields[13]) + int(fields[14])) / CLK_TCK  # reaped children
        processes += 1
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1]) * 1024
    return {"cpu": cpu, "rss": rss, "hwm": hwm, "processes": processes,
            "t": now_ns()}
