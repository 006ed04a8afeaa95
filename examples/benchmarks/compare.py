"""Compare sockserv's engines with the standard library's servers, side by side.

    python examples/benchmarks/compare.py                    # everything, 3 rounds
    python examples/benchmarks/compare.py --workloads pingpong-50,udp --rounds 1
    python examples/benchmarks/compare.py --list             # the servers and workloads

Each server (every engine in sockserv.engines.ENGINES, `select` with workers when
the config has a `workers` setting, and the baselines of baselines.py) runs as a
subprocess pinned to core 0 with taskset; the load comes from
`python -m sockserv bench ... --json --server-pid PID` pinned to core 1 (when the
machine has two cores or more and taskset is installed). Runs are interleaved:
round 1 runs every server on every workload, then round 2, ... so drift in the
machine's speed touches every server alike. The result is a Markdown table of
medians with the ratio to the asyncio baseline and the min-max spread over the
rounds, an SVG bar chart drawn with the standard library, and the raw results
as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BASELINES = HERE / "baselines.py"


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One scenario: the bench arguments, the server kind it needs, the figure compared."""

    key: str
    title: str
    kind: str  # echo-tcp, echo-udp or push
    args: tuple[str, ...]
    metric: str = "per_second"  # per_second; rss_per_connection or p99 (lower is better)
    unit: str = "msg/s"
    baseline: str = "asyncio Protocol"

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in ("rss_per_connection", "p99")

    @property
    def connections(self) -> int:
        """The client's ``-c``: connections (datagrams' sockets for udp)."""
        return int(self.args[self.args.index("-c") + 1])


HOLD_CONNECTIONS = 5_000
FORK_MAX_HOLD = 1000


def workloads(hold_connections: int = HOLD_CONNECTIONS) -> list[Workload]:
    """The comparison's scenarios (64-byte messages)."""
    return [
        Workload("pingpong-50", "ping-pong, 50 connections", "echo-tcp",
                 ("pingpong", "-c", "50")),
        Workload("pingpong-1000", "ping-pong, 1,000 connections", "echo-tcp",
                 ("pingpong", "-c", "1000")),
        Workload("pipeline", "pipelined, 50 connections x 16 in flight", "echo-tcp",
                 ("pipeline", "-c", "50", "-k", "16")),
        # From one source address, the ports left in TIME_WAIT make the client's port
        # search the limit past about 14,000 cycles a second: spread over 8 addresses.
        Workload("connrate", "connection rate (connect, one echo, close), 50 at once",
                 "echo-tcp", ("connrate", "-c", "50", "--source-addrs", "8"), unit="conn/s"),
        Workload("hold", f"idle connections: server RSS per connection, "
                         f"{hold_connections:,} held", "echo-tcp",
                 ("hold", "-c", str(hold_connections)), metric="rss_per_connection",
                 unit="B/conn"),
        Workload("udp", "UDP, 50 datagrams outstanding", "echo-udp", ("udp", "-c", "1", "-k", "50"),
                 baseline="asyncio DatagramProtocol"),
        Workload("fanout", "fan-out: 1,000 subscribers, 100 msg/s: p99 delivery latency", "push",
                 ("fanout", "-c", "1000", "--rate", "100"), metric="p99", unit="p99 µs",
                 baseline="asyncio push"),
    ]


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A server to compare: its name, what it serves, and how to start it on a port."""

    name: str
    kinds: frozenset[str]
    command: Any  # (kind, port, connections) -> argv
    pinned: bool = True
    note: str = ""
    max_hold: int | None = None  # a process per connection: too heavy to hold more than this

    def runs(self, workload: Workload) -> bool:
        """Whether this server takes part in ``workload``."""
        if workload.kind not in self.kinds:
            return False
        if workload.metric == "rss_per_connection" and self.max_hold is not None:
            return workload.connections <= self.max_hold
        return True


def sockserv_servers(python: str) -> list[Server]:
    """Every engine of sockserv.engines.ENGINES, and select with workers when configurable."""
    sys.path.insert(0, str(ROOT))
    from sockserv.cli import SERVER_COMMANDS
    from sockserv.config import SETTINGS
    from sockserv.engines import ENGINES

    has_push = "push" in SERVER_COMMANDS
    engines = sorted({engine for engine, _ in ENGINES}, key=lambda e: (e != "select", e))
    servers = []

    def command(engine: str, extra: tuple[str, ...] = ()) -> Any:
        def argv(kind: str, port: int, connections: int) -> list[str]:
            service = "push" if kind == "push" else "echo"
            limit = str(max(1000, connections + 100))
            args = [python, "-m", "sockserv", service, "--engine", engine, "--port", str(port),
                    "--log-level", "warning", "--max-connections", limit]
            if kind == "echo-udp":
                args += ["--proto", "udp"]
            return args + list(extra)
        return argv

    for engine in engines:
        kinds = {"echo-tcp"} if (engine, "tcp") in ENGINES else set()
        if (engine, "udp") in ENGINES:
            kinds.add("echo-udp")
        if has_push and (engine, "tcp") in ENGINES:
            kinds.add("push")
        servers.append(Server(f"sockserv {engine}", frozenset(kinds), command(engine),
                              max_hold=FORK_MAX_HOLD if engine == "fork" else None))
    if "workers" in SETTINGS and ("select", "tcp") in ENGINES:
        n = max(2, os.cpu_count() or 2)
        kinds = {"echo-tcp", "echo-udp"} | ({"push"} if has_push else set())
        servers.append(Server(f"sockserv select, {n} workers", frozenset(kinds),
                              command("select", ("--workers", str(n))), pinned=False,
                              note="not pinned: its workers share the cores with the client"))
    return servers


def baseline_servers(python: str) -> list[Server]:
    """The standard library's servers (and uvloop's, when installed)."""
    def command(kind: str, uvloop: bool = False) -> Any:
        def argv(_kind: str, port: int, connections: int) -> list[str]:
            return [python, str(BASELINES), kind, "--port", str(port)] + (
                ["--uvloop"] if uvloop else [])
        return argv

    servers = [
        Server("socketserver threading", frozenset({"echo-tcp"}), command("threading")),
        Server("socketserver forking", frozenset({"echo-tcp"}), command("forking"),
               max_hold=FORK_MAX_HOLD),
        Server("asyncio Protocol", frozenset({"echo-tcp"}), command("asyncio-protocol")),
        Server("asyncio streams", frozenset({"echo-tcp"}), command("asyncio-streams")),
        Server("asyncio DatagramProtocol", frozenset({"echo-udp"}), command("asyncio-udp")),
        Server("asyncio push", frozenset({"push"}), command("asyncio-push")),
    ]
    if _has_uvloop(python):
        servers += [
            Server("uvloop Protocol", frozenset({"echo-tcp"}), command("asyncio-protocol", True)),
            Server("uvloop DatagramProtocol", frozenset({"echo-udp"}),
                   command("asyncio-udp", True)),
            Server("uvloop push", frozenset({"push"}), command("asyncio-push", True)),
        ]
    return servers


def _has_uvloop(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import uvloop"], capture_output=True, timeout=30)
    return probe.returncode == 0


# --------------------------------------------------------------------------- running


def free_port(proto: str = "tcp") -> int:
    """A port nothing listens on right now (TCP and UDP both free)."""
    while True:
        with socket.socket(type=socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(type=socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue


def wait_ready(port: int, kind: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until the server answers on ``port`` (TCP connect; UDP: an echoed datagram)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if kind == "echo-udp":
                with socket.socket(type=socket.SOCK_DGRAM) as s:
                    s.settimeout(0.2)
                    s.sendto(b"ready?", ("127.0.0.1", port))
                    if s.recv(64) == b"ready?":
                        return
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not answering on port {port} after {timeout:g} s")


def server_env() -> dict[str, str]:
    """The environment for servers and clients: this checkout first on the path, and no
    SOCKSERV_* settings from the shell, which would change only the sockserv servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSERV_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s (this script's own child, by pid)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_one(server: Server, workload: Workload, opts: argparse.Namespace,
            log_dir: Path) -> dict[str, Any]:
    """Start ``server``, run the bench of ``workload`` against it, stop it; a record dict."""
    record: dict[str, Any] = {"server": server.name, "workload": workload.key,
                              "result": None, "error": None}
    port = free_port()
    connections = workload.connections
    pin_server = pin_client = []
    if opts.pin:
        pin_server = ["taskset", "-c", "0"] if server.pinned else []
        pin_client = ["taskset", "-c", "1"]
    log_path = log_dir / f"{server.name.replace(' ', '_').replace(',', '')}.log"
    env = server_env()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(pin_server + server.command(workload.kind, port, connections),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        try:
            wait_ready(port, workload.kind, proc)
            bench = [*pin_client, opts.python, "-m", "sockserv", "bench", *workload.args,
                     "--port", str(port), "--duration", str(opts.duration),
                     "--warmup", str(opts.warmup), "--procs", str(opts.procs),
                     "--server-pid", str(proc.pid), "--json", "--no-progress"]
            limit = opts.duration + opts.warmup + 120
            done = subprocess.run(bench, capture_output=True, text=True, timeout=limit, env=env,
                                  stdin=subprocess.DEVNULL)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if lines:
                record["result"] = json.loads(lines[-1])
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
                record["error"] = tail[-1]
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            record["error"] = str(exc)
        finally:
            stop_server(proc)
    return record


# --------------------------------------------------------------------------- summarising


@dataclass
class Summary:
    """One server on one workload, over the rounds."""

    median: float | None
    low: float | None
    high: float | None
    runs: int
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us: float | None = None
    errors: int = 0
    failures: list[str] = field(default_factory=list)


def metric_of(result: dict[str, Any] | None, metric: str) -> float | None:
    """The compared figure of one bench result (None if missing)."""
    if not result:
        return None
    if metric == "rss_per_connection":
        return (result.get("server") or {}).get("rss_per_connection")
    if metric == "p99":
        return (result.get("latency_us") or {}).get("p99")
    return result.get(metric)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]], work: list[Workload]) -> dict[str, dict[str, Summary]]:
    """workload key -> server name -> Summary, from run records (see run_one)."""
    by_key = {w.key: w for w in work}
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rec in records:
        grouped.setdefault(rec["workload"], {}).setdefault(rec["server"], []).append(rec)
    out: dict[str, dict[str, Summary]] = {}
    for key, servers in grouped.items():
        metric = by_key[key].metric if key in by_key else "per_second"
        for name, recs in servers.items():
            values = [v for r in recs if (v := metric_of(r["result"], metric)) is not None]
            lat = [r["result"]["latency_us"] for r in recs if r["result"]
                   and r["result"].get("latency_us")]
            cpu = [r["result"]["server"]["cpu_per_message_us"] for r in recs if r["result"]
                   and (r["result"].get("server") or {}).get("cpu_per_message_us") is not None]
            out.setdefault(key, {})[name] = Summary(
                median=_median(values), low=min(values) if values else None,
                high=max(values) if values else None, runs=len(values),
                p50_us=_median([x["p50"] for x in lat]), p99_us=_median([x["p99"] for x in lat]),
                cpu_us=_median(cpu),
                errors=sum((r["result"] or {}).get("error_count", 0) for r in recs),
                failures=[r["error"] for r in recs if r["error"]])
    return out


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _lat(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def markdown_table(summaries: dict[str, dict[str, Summary]], work: list[Workload],
                   server_order: list[str]) -> str:
    """One Markdown table per workload: median, ratio to the baseline, min-max spread,
    latency, server CPU per message, errors."""
    parts = []
    for w in work:
        rows = summaries.get(w.key)
        if not rows:
            continue
        base = rows.get(w.baseline)
        base_value = base.median if base else None
        better = "higher" if w.higher_is_better else "lower"
        parts.append(f"### {w.title}\n")
        parts.append(f"Median of the rounds; ratio to {w.baseline} ({better} is better).\n")
        parts.append(f"| server | {w.unit} | × {w.baseline} | spread (min–max) | p50 | p99 "
                     "| server CPU µs/msg | errors |")
        parts.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in [n for n in server_order if n in rows] + sorted(set(rows) - set(server_order)):
            s = rows[name]
            ratio = (f"{s.median / base_value:.2f}" if s.median is not None and base_value
                     else "-")
            spread = "-" if s.low is None else f"{_num(s.low)}–{_num(s.high)}"
            if s.median and s.low is not None and s.runs > 1:
                spread += f" (±{(s.high - s.low) / 2 / s.median * 100:.0f}%)"
            errors = str(s.errors)
            if s.failures:
                errors += f" ({len(s.failures)} failed run{'s' if len(s.failures) > 1 else ''})"
            label = f"**{name}**" if name == w.baseline else name
            parts.append(f"| {label} | {_num(s.median)} | {ratio} | {spread} | {_lat(s.p50_us)} "
                         f"| {_lat(s.p99_us)} | {_num(s.cpu_us, 2)} | {errors} |")
        parts.append("")
    return "\n".join(parts)


def overview_table(summaries: dict[str, dict[str, Summary]], work: list[Workload],
                   server_order: list[str]) -> str:
    """One row per server, one column per workload: the median's ratio to that
    workload's baseline (for lower-is-better workloads, a ratio under 1 is better)."""
    shown = [w for w in work if summaries.get(w.key)]
    head = " | ".join(f"{w.key} ({'↑' if w.higher_is_better else '↓'})" for w in shown)
    lines = [f"| server | {head} |", "|---|" + "---:|" * len(shown)]
    names = [n for n in server_order if any(n in summaries[w.key] for w in shown)]
    for name in names:
        cells = []
        for w in shown:
            s, base = summaries[w.key].get(name), summaries[w.key].get(w.baseline)
            if s is None or s.median is None or base is None or not base.median:
                cells.append("-")
            else:
                cells.append(f"{s.median / base.median:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def svg_chart(summaries: dict[str, dict[str, Summary]], work: list[Workload],
              server_order: list[str], title: str = "sockserv comparison") -> str:
    """Small multiples: one panel per workload, one horizontal bar per server (the median),
    a whisker for the min-max spread, the value and the ratio to the baseline."""
    label_w, bar_w, value_w, bar_h, gap = 220, 360, 170, 16, 6
    width = label_w + bar_w + value_w + 20
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(server_order)}
    out: list[str] = []
    y = 40
    for w in work:
        rows = summaries.get(w.key)
        if not rows:
            continue
        names = [n for n in server_order if n in rows] + sorted(set(rows) - set(server_order))
        top = max([s.high or s.median or 0 for s in rows.values()] + [1e-9])
        base = rows.get(w.baseline)
        base_value = base.median if base else None
        better = "higher" if w.higher_is_better else "lower"
        out.append(f'<text x="10" y="{y + 14}" class="h">{html.escape(w.title)} '
                   f'({html.escape(w.unit)}, {better} is better)</text>')
        y += 24
        for name in names:
            s = rows[name]
            colour = colours.get(name, "#999999")
            out.append(f'<text x="{label_w - 8}" y="{y + bar_h - 4}" class="l">'
                       f'{html.escape(name)}</text>')
            if s.median is not None:
                length = bar_w * s.median / top
                out.append(f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" '
                           f'fill="{colour}"><title>{html.escape(name)}: {_num(s.median)} '
                           f'{html.escape(w.unit)}</title></rect>')
                if s.low is not None and s.high is not None and s.high > s.low:
                    x1 = label_w + bar_w * s.low / top
                    x2 = label_w + bar_w * s.high / top
                    mid = y + bar_h / 2
                    out.append(f'<path d="M{x1:.1f} {mid:.1f}H{x2:.1f}M{x1:.1f} {mid - 4:.1f}'
                               f'V{mid + 4:.1f}M{x2:.1f} {mid - 4:.1f}V{mid + 4:.1f}" '
                               'class="w"/>')
                text = _num(s.median)
                if base_value:
                    text += f"  ×{s.median / base_value:.2f}"
            else:
                text = "failed"
            out.append(f'<text x="{label_w + bar_w + 8}" y="{y + bar_h - 4}" class="v">'
                       f'{html.escape(text)}</text>')
            y += bar_h + gap
        y += 14
    height = y + 10
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
            '<style>.h{font-weight:bold;font-size:13px}.l{text-anchor:end}'
            '.w{stroke:#000;stroke-width:1;fill:none}.t{font-size:15px;font-weight:bold}</style>\n'
            f'<rect width="{width}" height="{height}" fill="#ffffff"/>\n'
            f'<text x="10" y="24" class="t">{html.escape(title)}</text>\n')
    return head + "\n".join(out) + "\n</svg>\n"


def machine() -> str:
    """One line about the machine and the software."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model or platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="all",
                        help="comma-separated workload keys (see --list); default all")
    parser.add_argument("--servers", default="all",
                        help="comma-separated server names or parts of names (see --list); "
                             "default all")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--duration", type=float, default=1.0,
                        help="measured seconds per run (default 1)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="warm-up seconds per run (default 0.5)")
    parser.add_argument("--hold-connections", type=int, default=HOLD_CONNECTIONS,
                        help=f"connections of the hold workload (default {HOLD_CONNECTIONS:,}; "
                             f"servers with a process per connection join at {FORK_MAX_HOLD:,} "
                             "or fewer)")
    parser.add_argument("--procs", type=int, default=1, help="bench client processes (default 1)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every process")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="don't pin the server to core 0 and the client to core 1")
    parser.add_argument("--markdown", default="compare-results.md", metavar="PATH",
                        help="the Markdown output (default compare-results.md)")
    parser.add_argument("--svg", default="compare-results.svg", metavar="PATH",
                        help="the chart (default compare-results.svg)")
    parser.add_argument("--json", default="compare-results.json", metavar="PATH",
                        help="the raw results (default compare-results.json)")
    parser.add_argument("--list", action="store_true", help="list servers and workloads, exit")
    parser.add_argument("--from-json", metavar="PATH",
                        help="don't run anything: rebuild the table and chart from the raw "
                             "results of an earlier run")
    opts = parser.parse_args(argv)

    work = workloads(opts.hold_connections)
    servers = sockserv_servers(opts.python) + baseline_servers(opts.python)
    if opts.list:
        for w in work:
            print(f"workload {w.key:14} {w.title}")
        for s in servers:
            print(f"server   {s.name:30} {', '.join(sorted(s.kinds))}")
        return 0
    if opts.workloads != "all":
        wanted = opts.workloads.split(",")
        unknown = [k for k in wanted if k not in {w.key for w in work}]
        if unknown:
            parser.error(f"unknown workload(s): {', '.join(unknown)} (see --list)")
        work = [w for w in work if w.key in wanted]
    if opts.servers != "all":
        parts = [p.strip().lower() for p in opts.servers.split(",")]
        servers = [s for s in servers if any(p in s.name.lower() for p in parts)]
        if not servers:
            parser.error("no server matches --servers (see --list)")
    opts.pin = opts.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None

    plan = [(s, w) for w in work for s in servers if s.runs(w)]
    records: list[dict[str, Any]] = []
    if opts.from_json:
        return report_from_json(Path(opts.from_json), work, servers, opts)
    log_dir = Path(tempfile.mkdtemp(prefix="sockserv-compare-"))
    started = time.monotonic()
    for rnd in range(1, opts.rounds + 1):
        # interleaved: every server on every workload in each round; the order rotates
        shift = (rnd - 1) % max(1, len(servers))
        order = servers[shift:] + servers[:shift]
        for w in work:
            for s in order:
                if not s.runs(w):
                    continue
                rec = run_one(s, w, opts, log_dir)
                rec["round"] = rnd
                records.append(rec)
                res = rec["result"]
                figure = metric_of(res, w.metric)
                print(f"round {rnd}/{opts.rounds} {w.key:14} {s.name:30} "
                      f"{_num(figure):>12} {w.unit}"
                      + (f"  [{rec['error']}]" if rec["error"] else ""), flush=True)
    elapsed = time.monotonic() - started

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{stamp}; {machine()}; {len(plan)} runs × {opts.rounds} rounds in {elapsed:.0f} s; "
              f"{opts.duration:g} s measured after {opts.warmup:g} s warm-up per run; "
              + ("server pinned to core 0, client to core 1 (taskset)" if opts.pin
                 else "not pinned") + "; 64-byte messages.")
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    write_report(records, work, servers, opts, header, stamp, machine(),
                 "python examples/benchmarks/compare.py " + argv_text)
    print(f"(server logs in {log_dir})")
    return 0


def report_from_json(path: Path, work: list[Workload], servers: list[Server],
                     opts: argparse.Namespace) -> int:
    """Rebuild the outputs from an earlier run's raw results (``--from-json``)."""
    data = json.loads(path.read_text())
    records = data["records"]
    keys = {r["workload"] for r in records}
    work = [w for w in work if w.key in keys]
    header = data.get("header") or f"{data['when']}; {data['machine']}."
    write_report(records, work, servers, opts, header, data["when"], data["machine"],
                 data.get("command", "python examples/benchmarks/compare.py"))
    return 0


def write_report(records: list[dict[str, Any]], work: list[Workload], servers: list[Server],
                 opts: argparse.Namespace, header: str, stamp: str, machine_text: str,
                 command: str) -> None:
    """Write the Markdown tables, the SVG chart and the raw JSON; print the tables."""
    summaries = summarize(records, work)
    order = [s.name for s in servers]
    notes = [f"- {s.name}: {s.note}" for s in servers if s.note]
    notes += [f"- {s.name}: left out of `{w.key}` (a process per connection; at most "
              f"{s.max_hold:,} held)" for w in work for s in servers
              if w.kind in s.kinds and not s.runs(w)]
    text = "\n".join([
        "## sockserv comparison",
        "",
        header,
        "",
        f"Reproduce: `{command.strip()}`",
        "",
        *notes,
        "" if notes else "",
        "### Overview: each server's median as a multiple of the baseline's",
        "",
        "↑: higher is better (throughput); ↓: lower is better (memory, latency).",
        "",
        overview_table(summaries, work, order),
        markdown_table(summaries, work, order),
    ])
    Path(opts.markdown).write_text(text)
    Path(opts.svg).write_text(svg_chart(summaries, work, order,
                                        title=f"sockserv comparison ({stamp})"))
    if not opts.from_json:
        Path(opts.json).write_text(json.dumps({"machine": machine_text, "when": stamp,
                                               "header": header, "command": command,
                                               "records": records}, indent=1))
    print(text)
    print(f"wrote {opts.markdown}, {opts.svg}" + ("" if opts.from_json else f", {opts.json}"))


if __name__ == "__main__":
    sys.exit(main())
