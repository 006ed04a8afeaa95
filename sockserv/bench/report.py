"""Output: the human summary of a result dict, and the formatting helpers it and the
progress line share.
"""

from __future__ import annotations

from typing import Any

from ..connection import format_address
from .options import Options

__all__ = ["format_summary"]


def _target(o: Options) -> str:
    host = o.host
    return f"[{host}]:{o.port}" if ":" in host else f"{host}:{o.port}"


def _publish_target(o: Options) -> str:
    """fanout: the publisher's server (``--publish-host``/``--publish-port``, else the
    subscribers')."""
    return format_address((o.publish_host or o.host, o.publish_port or o.port))


def _unit(o: Options) -> str:
    return {"connrate": "conn", "fanout": "deliveries", "hold": "pings",
            "soak": "round trips"}.get(o.workload, "msg")


def _fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us" if us >= 10 else f"{us:.1f}us"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1e6:.2f}s"


def _singular(unit: str) -> str:
    return {"deliveries": "delivery"}.get(unit, unit.rstrip("s"))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n / 1024:.1f} GiB"


def format_summary(r: dict[str, Any]) -> str:
    """The human summary table of a result dict."""
    wl = r["workload"]
    if wl == "soak":
        return _format_soak(r)
    n = f"{r['connections']:,}"
    if wl == "pingpong":
        shape = f"{n} connections, 1 in flight"
    elif wl == "pipeline":
        shape = f"{n} connections x {r['pipeline']} in flight"
    elif wl == "connrate":
        shape = f"{n} concurrent connectors"
    elif wl == "hold":
        shape = f"{n} connections held {r['duration']:g} s"
    elif wl == "fanout":
        shape = f"{n} subscribers, {r['rate']:g} msg/s"
        if r.get("publish_target"):
            shape += f" published on {r['publish_target']}"
    else:
        shape = f"{n} socket(s) x {r['pipeline']} outstanding"
    if wl in ("pingpong", "pipeline") and r["proto"] == "udp":
        shape = f"{r['connections']:,} UDP socket(s) x {r['pipeline']} outstanding"
    window = "" if wl == "hold" else f", {r['window_s']:g} s after {r['warmup']:g} s warm-up"
    rows = [f"bench {wl}: {r['target']} {r['proto']}, {shape}, {r['size']} B{window}, "
            f"{_plural(r['procs'], 'client process')}"]
    unit = {"connrate": "connections", "fanout": "deliveries"}.get(wl, "messages")
    c = r["counts"]
    if wl == "hold":
        rows.append(("held", f"{c['held']:,} connections (set up in {c['setup_s']:g} s), "
                             f"{c['answered']:,} answered afterwards"))
    else:
        rows.append(("throughput", f"{r['per_second']:,.1f} {unit}/s "
                                   f"({r['messages']:,} in {r['window_s']:g} s)"))
    rows.append(("latency", _percentiles(r["latency_us"])))
    if wl == "fanout":
        rows.append(("fanout", f"published {c['published']:,}, delivered {c['delivered']:,} of "
                               f"{c['expected']:,}; lost {c['lost']:,}, duplicates "
                               f"{c['duplicates']:,}, reordered {c['reordered']:,}"))
    else:
        extra = ""
        if "lost" in c:
            extra = f", lost {c['lost']:,}, late {c['late']:,}"
        rows.append(("messages", f"sent {c['sent']:,}, received {c['received']:,}, "
                                 f"verified {c['verified']:,}{extra}"))
    rows.append(("errors", _errors_text(r)))
    rows += _server_rows(r, unit)
    lines = [rows[0]]
    lines += [f"  {k:<11} {v}" for k, v in rows[1:]]
    return "\n".join(lines) + "\n"


def _errors_text(r: dict[str, Any]) -> str:
    if not r["error_count"]:
        return "none"
    detail = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in r["errors"].items() if v)
    text = f"{r['error_count']:,} ({detail})"
    if r["first_error"]:
        text += f"; first: {r['first_error']}"
    return text


def _server_rows(r: dict[str, Any], unit: str) -> list[tuple[str, str]]:
    """The server, client and note rows of the summary."""
    rows = []
    s = r["server"]
    if s and not s.get("gone"):
        per = s["cpu_per_message_us"]
        text = (f"pid {s['pid']} ({_plural(s['processes'], 'process')}): {s['cpu_s']:g} s CPU "
                f"({s['cpu_share'] * 100:.0f}% of a core)")
        if per is not None:
            text += f", {per:.2f} us CPU per {_singular(unit)}"
        text += f", RSS {_fmt_bytes(s['rss_bytes'])} (peak {_fmt_bytes(s['peak_rss_bytes'])})"
        if "rss_per_connection" in s:
            text += f", {s['rss_per_connection']:,.0f} B per held connection"
        rows.append(("server", text))
    elif s:
        rows.append(("server", f"pid {s['pid']} ended before the window closed"))
    rows.append(("client", f"{r['client_cpu_s']:g} s CPU in {_plural(r['procs'], 'process')}"))
    if r["interrupted"]:
        rows.append(("note", "interrupted: the figures cover the part that ran"))
    return rows


def _percentiles(lat: dict[str, float] | None) -> str:
    if not lat:
        return "no samples"
    return "  ".join(f"{k} {_fmt_us(lat[k])}" for k in ("p50", "p90", "p99", "p99.9", "max"))


def _format_soak(r: dict[str, Any]) -> str:
    """The summary table of a soak run."""
    c = r["counts"]
    rows: list[tuple[str, str]] = [
        ("throughput", f"{r['per_second']:,.1f} messages/s (round trips and deliveries: "
                       f"{r['messages']:,} in {r['window_s']:g} s)"),
        ("pings", f"{c['pings']:,} sent, {c['round_trips']:,} answered; round trip "
                  f"{_percentiles(r['latency_us'])}"),
        ("push", f"published {c['published']:,}, accepted {c['accepted']:,}; deliveries "
                 f"expected {c['expected']:,}, delivered {c['delivered']:,}, lost {c['lost']:,}"
                 f"; duplicates {c['duplicates']:,}, reordered {c['reordered']:,}"),
        ("delivery", _percentiles(r["delivery_latency_us"])),
    ]
    faults = []
    for kind, f in r["faults"].items():
        notes = [f"{f[k]:,} {k}" for k in ("shed", "failed") if f[k]]
        faults.append(f"{kind} {f['run']:,}" + (f" ({', '.join(notes)})" if notes else ""))
    rows.append(("faults", "none" if not r["fault_rate"] else ", ".join(faults)))
    rows.append(("errors", _errors_text(r)))
    s = r["server"]
    if s and "rss_start_bytes" in s:
        rows.append(("rss", f"{_fmt_bytes(s['rss_start_bytes'])} after the warm-up, "
                            f"{_fmt_bytes(s['rss_end_bytes'])} at the end "
                            f"({s['rss_change_pct']:+.1f}%, limit {s['rss_limit_pct']:g}%"
                            f"{'' if s['rss_ok'] else ': EXCEEDED'})"))
    rows += _server_rows(r, "messages")
    head = (f"bench soak: {r['target']} tcp, {r['connections']:,} subscribers on "
            f"{r['channels']} channels ({c['late_subscribers']:,} joined late), "
            f"{r['publishers']} publishers at {r['rate']:g} msg/s in all, {r['pingers']} "
            f"pingers, faults {r['fault_rate']:g}/s of each kind, {r['size']} B, "
            f"{r['window_s']:g} s after {r['warmup']:g} s warm-up, "
            f"{_plural(r['procs'], 'client process')}")
    return "\n".join([head] + [f"  {k:<11} {v}" for k, v in rows]) + "\n"
