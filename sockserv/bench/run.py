"""The parent's side of a run: start the clients together, sample the server, show
progress, merge the results (:func:`build_result`); and :func:`main`, the command.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import selectors
import signal
import struct
import sys
import time
from typing import Any

from .common import ERRORS, READ, now_ns
from .histogram import Histogram
from .options import Options, UsageError, resolve
from .processes import Child, _reap, _spawn
from .procstat import server_sample
from .report import _fmt_us, _publish_target, _target, _unit, format_summary
from .soak import FAULTS, soak_accounting

__all__ = ["Run", "build_result", "SOAK_ERRORS", "main"]


class Run:
    """The parent: start the clients together, sample the server, show progress, merge."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.children: list[Child] = []
        self.sel = selectors.DefaultSelector()
        self.baseline: dict[str, Any] | None = None
        self.at_start: dict[str, Any] | None = None
        self.at_end: dict[str, Any] | None = None
        self.interrupted = False
        self.setup_s = 0.0
        self.progress_shown = False
        self.t0 = 0

    def pump(self, timeout: float) -> None:
        """Read the children's reports for up to ``timeout`` seconds."""
        for key, _ in self.sel.select(max(0.0, timeout)):
            child = key.data
            child.feed()
            if child.eof:
                self.sel.unregister(child.rep)

    def execute(self) -> dict[str, Any]:
        """Run the whole benchmark; returns the result dict (see :func:`build_result`)."""
        o = self.o
        if o.server_pid:
            self.baseline = server_sample(o.server_pid)
        started = time.monotonic()
        self.children = _spawn(o)
        old = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            for child in self.children:
                self.sel.register(child.rep, READ, child)
            ws = self._drive(started)
        finally:
            signal.signal(signal.SIGINT, old)
            self._clear_progress()
            _reap(self.children, time.monotonic() + 5)
            self.sel.close()
        return self.result(ws)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Ctrl-C: the children (which ignore SIGINT) see their control pipe close and stop;
        # their final reports still arrive and the summary covers what ran.
        self.interrupted = True
        for child in self.children:
            child.close_ctl()

    def _drive(self, started: float) -> int:
        """Set up, start, run and collect the children; returns the window start (ns)."""
        o = self.o
        setup_deadline = started + o.setup_timeout + 10
        while not all(c.ready or c.failed or c.eof for c in self.children):
            if self.interrupted:
                raise RuntimeError("interrupted during setup")
            if time.monotonic() > setup_deadline:
                raise RuntimeError("client processes did not finish setting up")
            self.pump(0.2)
        failed = [c.failed or "exited unexpectedly" for c in self.children if not c.ready]
        if failed:
            raise RuntimeError(f"client process failed: {failed[0]}")
        self.setup_s = time.monotonic() - started
        connected = sum(c.ready["connected"] for c in self.children)
        if not connected:
            first = next((c.ready["first_error"] for c in self.children if c.ready["first_error"]),
                         "")
            raise RuntimeError(f"no connection to {_target(o)}" + (f" ({first})" if first else ""))
        t0 = self.t0 = now_ns() + 20_000_000
        for child in self.children:
            if child.ctl is not None:
                os.write(child.ctl, struct.pack("!q", t0))
        ws = t0 + int(o.warmup * 1e9)
        we = ws + int(o.duration * 1e9)
        hard = we + int((o.grace + 5) * 1e9)
        next_progress = t0 + 1_000_000_000
        stopping = False
        while not all(c.final or c.failed or c.eof for c in self.children):
            now = now_ns()
            if self.interrupted and not stopping:
                stopping = True
                hard = min(hard, now + int((o.grace + 3) * 1e9))
            if now >= hard:
                break
            if o.server_pid and self.at_start is None and now >= ws:
                self.at_start = server_sample(o.server_pid)
            if o.server_pid and self.at_end is None and now >= we:
                self.at_end = server_sample(o.server_pid)
            if o.progress and now >= next_progress:
                self._show_progress(now, ws, we)
                next_progress = now + 1_000_000_000
            wake = min(hard, next_progress if o.progress else hard,
                       ws if self.at_start is None else hard,
                       we if self.at_end is None else hard)
            self.pump((wake - now) / 1e9)
        if o.server_pid:
            if self.at_start is None:
                self.at_start = server_sample(o.server_pid)
            if self.at_end is None:
                self.at_end = server_sample(o.server_pid)
        failed = [c.failed for c in self.children if c.failed]
        if failed:
            raise RuntimeError(f"client process failed: {failed[0]}")
        return ws

    def merged(self) -> tuple[dict[str, int], Histogram, str, bool]:
        """Counters and histogram summed over the children's latest reports."""
        counts: dict[str, int] = collections.defaultdict(int)
        hist = Histogram()
        first = ""
        interrupted = self.interrupted
        for child in self.children:
            snap = child.snap
            if snap is None:
                continue
            for k, v in snap["c"].items():
                counts[k] += v
            hist.merge(snap["h"])
            first = first or snap["first_error"]
            interrupted = interrupted or snap["interrupted"]
        return counts, hist, first, interrupted

    def _show_progress(self, now: int, ws: int, we: int) -> None:
        counts, hist, _, _ = self.merged()
        elapsed = (now - self.t0) / 1e9
        soak = self.o.workload == "soak"
        errors = sum(counts.get(name, 0) for name in (SOAK_ERRORS if soak else ERRORS))
        if self.o.workload == "hold":
            text = (f"holding {counts.get('open', 0):,} connections" if now < we else
                    f"{counts.get('verified', 0):,} answered")
        elif now < ws:
            text = "warming up"
        else:
            rate = 0.0  # each child's count over the time up to its last report
            for child in self.children:
                if child.snap and child.snap["t"] > ws:
                    span = (min(child.snap["t"], we) - ws) / 1e9
                    rate += child.snap["c"].get("window", 0) / span
            text = (f"{rate:,.0f} {_unit(self.o)}/s  p50 {_fmt_us(hist.percentile(50) / 1e3)}"
                    f"  p99 {_fmt_us(hist.percentile(99) / 1e3)}")
            if soak:
                text += (f"  delivered {counts.get('received', 0):,}"
                         f"  faults {counts.get('faults_run', 0):,}")
        line = f"\r[{elapsed:5.1f}s] {self.o.workload}  {text}  errors {errors}"
        sys.stderr.write(line + "\033[K")
        sys.stderr.flush()
        self.progress_shown = True

    def _clear_progress(self) -> None:
        if self.progress_shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def result(self, ws: int) -> dict[str, Any]:
        """The figures of the run (the ``--json`` object)."""
        counts, hist, first_error, interrupted = self.merged()
        o = self.o
        window = o.duration
        if interrupted:
            window = max(1e-3, min(o.duration, (now_ns() - ws) / 1e9))
        delivery = None
        if o.workload == "soak":
            extras = [child.snap.get("x") if child.snap else None for child in self.children]
            delivery = Histogram()
            for extra in extras:
                if extra:
                    delivery.merge(extra["hd"])
            counts.update(soak_accounting(extras))
        return build_result(o, counts, hist, window, first_error, interrupted,
                            self.baseline, self.at_start, self.at_end, self.setup_s,
                            sum(c.cpu for c in self.children), delivery)


def build_result(o: Options, counts: dict[str, int], hist: Histogram, window: float,
                 first_error: str, interrupted: bool, baseline: dict[str, Any] | None,
                 at_start: dict[str, Any] | None, at_end: dict[str, Any] | None,
                 setup_s: float, client_cpu: float,
                 delivery: Histogram | None = None) -> dict[str, Any]:
    """Assemble the result dict from merged counters, histogram and server samples
    (``delivery``: soak's histogram of publish-to-delivery times)."""
    wl = o.workload
    messages = counts.get("verified", 0) if wl == "hold" else counts.get("window", 0)
    if wl == "soak":  # round trips and deliveries in the window
        messages += counts.get("dwindow", 0)
    out_counts: dict[str, Any] = {
        "sent": counts.get("sent", 0), "received": counts.get("received", 0),
        "verified": counts.get("verified", 0), "connected": counts.get("connected", 0),
    }
    errors = {name: counts.get(name, 0) for name in ERRORS}
    if o.mode in ("echo", "hold"):
        out_counts["abandoned"] = counts.get("abandoned", 0)
    if wl == "connrate":
        out_counts["connects"] = counts.get("connects", 0)
    if o.mode == "udp":
        out_counts["lost"] = counts.get("lost", 0)
        out_counts["late"] = counts.get("late", 0)
    if wl == "hold":
        out_counts["held"] = counts.get("connected", 0)
        out_counts["answered"] = counts.get("verified", 0)
        out_counts["setup_s"] = round(setup_s, 3)
    if wl == "fanout":
        published = counts.get("published", 0)
        subscribers = counts.get("subscribers", 0)
        expected = published * subscribers
        delivered = counts.get("delivered", 0)
        out_counts.update(subscribers=subscribers, published=published,
                          acked=counts.get("acks", 0), expected=expected, delivered=delivered,
                          lost=max(0, expected - delivered),
                          duplicates=counts.get("duplicates", 0),
                          reordered=counts.get("reordered", 0))
        out_counts["received"] = delivered + counts.get("duplicates", 0)
        out_counts["verified"] = delivered
        if o.proto == "tcp":  # over TCP nothing may go missing; over UDP loss is counted only
            errors["lost"] = out_counts["lost"]
            errors["duplicates"] = out_counts["duplicates"]
            errors["reordered"] = out_counts["reordered"]
    extra: dict[str, Any] = {}
    if wl == "soak":
        out_counts, errors, extra = _soak_figures(o, counts, delivery)
    error_count = sum(errors.values())
    server = None
    if o.server_pid:
        server = {"pid": o.server_pid}
        if at_start and at_end:
            cpu = max(0.0, at_end["cpu"] - at_start["cpu"])
            sampled = (at_end["t"] - at_start["t"]) / 1e9  # the window as sampled
            server.update(cpu_s=round(cpu, 3), cpu_share=round(cpu / window, 3),
                          sampled_s=round(sampled, 3),
                          cpu_per_message_us=(round(cpu / messages * 1e6, 3)
                                              if messages and wl != "hold" else None),
                          rss_bytes=at_end["rss"], peak_rss_bytes=at_end["hwm"],
                          processes=at_end["processes"])
            if wl == "hold" and baseline and counts.get("connected"):
                held = max(at_start["rss"], at_end["rss"])
                server["rss_per_connection"] = round((held - baseline["rss"])
                                                     / counts["connected"], 1)
            if wl == "soak":
                change = (at_end["rss"] - at_start["rss"]) / max(1, at_start["rss"]) * 100
                server.update(rss_start_bytes=at_start["rss"], rss_end_bytes=at_end["rss"],
                              rss_change_pct=round(change, 2),
                              rss_limit_pct=o.max_rss_growth,
                              rss_ok=change <= o.max_rss_growth,
                              processes_start=at_start["processes"])
        else:
            server["gone"] = True
    ok = error_count == 0 and messages > 0 and not interrupted
    if server and (server.get("rss_ok") is False or wl == "soak" and server.get("gone")):
        ok = False
    return {
        "workload": wl, "target": _target(o), "proto": o.proto, "connections": o.connections,
        "publish_target": _publish_target(o) if o.publish_host or o.publish_port else None,
        "size": o.size, "pipeline": o.pipeline if o.mode in ("echo", "udp") else None,
        "rate": o.rate if wl in ("fanout", "soak") else None, "procs": o.procs,
        "source_addrs": o.source_addrs, "duration": o.duration, "warmup": o.warmup,
        "window_s": round(window, 3), "messages": messages,
        "per_second": round(messages / window, 1) if wl != "hold" else None,
        "latency_us": hist.summary(), "counts": out_counts, "errors": errors,
        "error_count": error_count, "first_error": first_error or None,
        "server": server, "client_cpu_s": round(client_cpu, 3),
        "interrupted": interrupted, "ok": ok, **extra,
    }


SOAK_ERRORS = (*ERRORS, "faults", "lost", "duplicates", "reordered")


def _soak_figures(o: Options, counts: dict[str, int], delivery: Histogram | None
                  ) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """soak's counts, errors and extra keys (faults per kind and outcome, settings)."""
    get = counts.get
    out_counts = {name: get(name, 0) for name in (
        "connected", "subscribers", "late_subscribers", "published", "accepted", "expected",
        "delivered", "lost", "duplicates", "reordered", "pings", "round_trips")}
    out_counts["received"] = get("received", 0)  # distinct messages, expected or not
    errors = {name: get(name, 0) for name in SOAK_ERRORS}
    errors["timeouts"] += get("incomplete", 0)  # a client process sent no final report
    faults = {kind: {outcome: get(f"fault.{kind}.{outcome}", 0)
                     for outcome in ("run", "ok", "shed", "failed")} for kind in FAULTS}
    extra = {"channels": o.channels, "publishers": o.publishers, "pingers": o.pingers,
             "fault_rate": o.fault_rate, "faults": faults,
             "delivery_latency_us": delivery.summary() if delivery else None}
    return out_counts, errors, extra


def main(args: argparse.Namespace) -> int:
    """``sockserv bench``: 0 when every reply checked out, 1 on errors, 2 on bad options."""
    try:
        opts = resolve(args)
    except UsageError as exc:
        print(f"sockserv: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = Run(opts).execute()
    except RuntimeError as exc:
        print(f"sockserv: error: bench: {exc}", file=sys.stderr)
        return 1
    if opts.json:
        print(json.dumps(result))
    else:
        sys.stdout.write(format_summary(result))
    if not result["ok"] and not opts.json:
        server = result["server"] or {}
        why = ("interrupted" if result["interrupted"] else
               f"{result['error_count']} error(s)" if result["error_count"] else
               f"the server's RSS grew {server['rss_change_pct']:+.1f}% (more than "
               f"{server['rss_limit_pct']:g}%)" if server.get("rss_ok") is False else
               "the server ended before the run did" if server.get("gone") else
               "nothing was measured")
        print(f"sockserv: bench failed: {why}", file=sys.stderr)
    if result["interrupted"]:
        return 130
    return 0 if result["ok"] else 1
