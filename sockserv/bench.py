"""load generator: pingpong, pipeline, connrate, hold, fanout, udp and soak workloads

``python -m sockserv bench WORKLOAD [options]`` drives any echo server (or, for
``fanout`` and ``soak``, any server speaking the push protocol of DESIGN.md) and
reports throughput, latency percentiles and errors; with ``--server-pid`` also the
server's CPU time per message and its memory. ``soak`` mixes request/response
clients, subscribers, publishers and misbehaving connections for a bounded time
and checks that nothing accepted is lost and that the server's memory stays flat.

How it works: the command forks ``--procs`` client processes. Each opens its
share of the connections, runs one ``selectors`` loop over non-blocking
sockets and checks every byte it gets back against what it sent (payloads come
from a precomputed random ring, so consecutive messages differ and a wrong,
stale or misplaced echo is caught). The parent starts them together, samples
``/proc/PID`` of the server at the edges of the measured window, prints the
live progress line and merges the results. Every phase is bounded: setup by
``--setup-timeout``, the run by ``--warmup`` + ``--duration`` + ``--grace``.
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import errno
import heapq
import ipaddress
import json
import math
import os
import pickle
import random
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import _integer
from .config import _seconds as _config_seconds
from .connection import format_address

__all__ = ["Histogram", "Options", "add_arguments", "main", "process_tree", "server_sample"]

WORKLOADS = ("pingpong", "pipeline", "connrate", "hold", "fanout", "udp", "soak")
# workload -> default connections, messages in flight (per connection or UDP socket)
DEFAULTS = {
    "pingpong": (50, 1),
    "pipeline": (50, 16),
    "connrate": (50, 1),
    "hold": (1000, 1),
    "fanout": (100, 1),
    "udp": (1, 50),
    "soak": (32, 1),
}
MAX_SIZE = 16 << 20
UDP_MAX_SIZE = 65507
STAMP = 24  # fanout/udp payload header: 16 hex digits of CLOCK_MONOTONIC ns + 8 of sequence
UDP_HEADER = 8  # udp payload header: 8 hex digits of sequence
REPORT_NS = 500_000_000  # how often a client process reports to the parent
ERRORS = ("mismatches", "resets", "timeouts", "connect_errors", "protocol")
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
now_ns = time.monotonic_ns


# --------------------------------------------------------------------------- histogram


class Histogram:
    """Latency histogram in nanoseconds with HDR-style log buckets.

    Values below 256 are exact; above, each power of two is split into 128
    buckets, so a percentile is off by at most 0.4%. Histograms from several
    processes merge by adding their bucket counts.
    """

    SUB = 128
    LINEAR = 256
    SIZE = LINEAR + 56 * SUB

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.n = 0
        self.total = 0
        self.max = 0

    @classmethod
    def index(cls, value: int) -> int:
        """The bucket of a value (ns)."""
        if value < cls.LINEAR:
            return max(value, 0)
        shift = value.bit_length() - 8
        return cls.LINEAR + (shift - 1) * cls.SUB + (value >> shift) - cls.SUB

    @classmethod
    def value(cls, index: int) -> int:
        """The middle of a bucket (ns)."""
        if index < cls.LINEAR:
            return index
        shift, top = divmod(index - cls.LINEAR, cls.SUB)
        shift += 1
        return ((top + cls.SUB) << shift) + (1 << (shift - 1))

    def record(self, value: int) -> None:
        """Count one latency of ``value`` ns."""
        if value < 256:
            self.counts[value if value > 0 else 0] += 1
        else:
            shift = value.bit_length() - 8
            self.counts[(shift << 7) + (value >> shift)] += 1
        self.n += 1
        self.total += value
        if value > self.max:
            self.max = value

    def percentile(self, q: float) -> int:
        """The value (ns) at or below which ``q`` percent of the samples lie; 0 when empty."""
        if not self.n:
            return 0
        rank = max(1, math.ceil(q / 100 * self.n))
        seen = 0
        for index, count in enumerate(self.counts):
            if count:
                seen += count
                if seen >= rank:
                    return min(self.value(index), self.max)
        return self.max

    def state(self) -> tuple[dict[int, int], int, int, int]:
        """A compact picklable copy: (non-zero buckets, n, total, max)."""
        return {i: c for i, c in enumerate(self.counts) if c}, self.n, self.total, self.max

    def merge(self, state: tuple[dict[int, int], int, int, int]) -> None:
        """Add a :meth:`state` of another histogram."""
        buckets, n, total, top = state
        for index, count in buckets.items():
            self.counts[index] += count
        self.n += n
        self.total += total
        self.max = max(self.max, top)

    def summary(self) -> dict[str, float] | None:
        """p50/p90/p99/p99.9/max/mean in microseconds, or None without samples."""
        if not self.n:
            return None
        out = {f"p{q:g}": round(self.percentile(q) / 1000, 1) for q in (50, 90, 99, 99.9)}
        out["max"] = round(self.max / 1000, 1)
        out["mean"] = round(self.total / self.n / 1000, 1)
        return out


# --------------------------------------------------------------------------- payloads


class Payloads:
    """A ring of ``count`` distinct random messages of ``size`` bytes.

    Connection ``i`` sends the ring's messages from ``start(i)`` on, so what it
    must read back at stream offset ``pos`` starts at ring offset
    ``(start(i) * size + pos) % ring_len``; ``ring2`` repeats the ring so any
    chunk up to ``extra`` bytes can be checked with one ``startswith`` (no copy).
    """

    def __init__(self, size: int, extra: int, seed: int = 7007) -> None:
        self.size = size
        self.count = max(16, min(4096, math.ceil(262144 / size)))
        rng = random.Random(seed)
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        self.ring = bytes(rng.choices(alphabet, k=size * self.count))
        self.ring_len = len(self.ring)
        copies = 1 + math.ceil(max(extra, 65536) / self.ring_len)
        self.ring2 = self.ring * copies
        self.view = memoryview(self.ring2)

    def start(self, conn_id: int) -> int:
        """The ring message connection ``conn_id`` starts with."""
        return (conn_id * 131) % self.count


def fills(length: int) -> list[bytes]:
    """26 filler strings of ``length`` letters, rotated: filler ``seq % 26`` goes with ``seq``."""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    reps = length // 26 + 2
    return [(letters[i:] + letters * reps)[:length] for i in range(26)]


# --------------------------------------------------------------------------- /proc sampling

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


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    """The resolved settings of one run (defaults filled in per workload)."""

    workload: str
    host: str = "127.0.0.1"
    port: int = 7007
    proto: str = "tcp"
    connections: int = 50
    size: int = 64
    duration: float = 5.0
    warmup: float = 1.0
    pipeline: int = 1
    rate: float = 100.0
    procs: int = 1
    source_addrs: int = 0
    timeout: float = 10.0
    grace: float = 2.0
    setup_timeout: float = 60.0
    max_pending: int = 256
    channel: str = "bench"
    channels: int = 4
    publishers: int = 4
    pingers: int = 4
    fault_rate: float = 1.0
    max_line: int = 65536
    max_rss_growth: float = 10.0
    server_pid: int | None = None
    json: bool = False
    progress: bool = False
    family: int = socket.AF_INET
    addr: Any = None
    sources: list[str] = field(default_factory=list)
    publish_host: str | None = None  # fanout: the publisher's server, when not the same
    publish_port: int | None = None
    publish_family: int = socket.AF_INET
    publish_addr: Any = None

    @property
    def mode(self) -> str:
        """The client code that runs: echo (TCP), udp, connrate, hold, fanout or soak."""
        if self.workload in ("pingpong", "pipeline"):
            return "udp" if self.proto == "udp" else "echo"
        return self.workload


class UsageError(Exception):
    """Bad options: one line, exit status 2."""


def _arg(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """A config parser (which raises ValueError) as an argparse type with a clear message."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapped


_positive_int = _arg(_integer(1))
_count = _arg(_integer(0))
_seconds = _arg(_config_seconds)
_port = _arg(_integer(1, 65535))


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"{text!r} is not a number 0 or more")
    return value


_non_negative = _arg(_non_negative_float)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` command's arguments."""
    parser.description = ("Load generator: drive an echo server (or a push server for fanout "
                          "and soak) and report throughput, latency percentiles and errors.")
    parser.add_argument("workload", choices=WORKLOADS, metavar="WORKLOAD",
                        help="pingpong, pipeline, connrate, hold, fanout, udp or soak")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=None,
                        help="server port (default 7007; fanout and soak 7070)")
    parser.add_argument("--proto", choices=("tcp", "udp"), default=None,
                        help="transport for pingpong, pipeline and fanout (default tcp; "
                             "the udp workload is always UDP)")
    parser.add_argument("--connections", "-c", type=_positive_int, default=None, metavar="N",
                        help="connections (fanout, soak: subscribers; connrate: concurrent "
                             "connectors; udp: sockets); default 50, hold 1000, fanout 100, "
                             "udp 1, soak 32")
    parser.add_argument("--size", "-s", type=_positive_int, default=64, metavar="BYTES",
                        help="message size (fanout: payload size, at least 24; soak: payload "
                             "size, at least 28, and the longest PING text) (default 64)")
    parser.add_argument("--duration", "-d", type=_seconds, default=None, metavar="SECONDS",
                        help="measured seconds (hold: how long the connections sit idle) "
                             "(default 5; soak 120)")
    parser.add_argument("--warmup", "-w", type=_seconds, default=None, metavar="SECONDS",
                        help="unmeasured seconds of load before the window (default 1; soak 5)")
    parser.add_argument("--pipeline", "-k", type=_positive_int, default=None, metavar="N",
                        help="messages in flight per connection or UDP socket "
                             "(default: pipeline 16, udp 50, pingpong 1)")
    parser.add_argument("--rate", type=float, default=100.0, metavar="PER_SECOND",
                        help="fanout: messages the publisher sends per second; soak: all "
                             "publishers together (default 100)")
    parser.add_argument("--procs", "-p", type=_positive_int, default=1, metavar="N",
                        help="client processes; connections are split between them (default 1)")
    parser.add_argument("--source-addrs", type=_count, default=0, metavar="N",
                        help="bind client sockets to 127.0.0.2 .. 127.0.0.(N+1) in turn "
                             "(more than ~28,000 connections to one port; connrate past "
                             "~14,000 cycles/s, when the ports in TIME_WAIT run short); "
                             "default 0: no bind")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="a reply (connrate: a whole cycle) slower than this is a timeout "
                             "(default 10; udp: a datagram unanswered for 0.5 s is lost)")
    parser.add_argument("--grace", type=_seconds, default=None, metavar="SECONDS",
                        help="after the window, how long to wait for replies still due "
                             "(default 2; hold 10; soak 5)")
    parser.add_argument("--setup-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                        help="most time to open the connections (default 60)")
    parser.add_argument("--max-pending", type=_positive_int, default=256, metavar="N",
                        help="connects in progress at once per process during setup (default 256)")
    parser.add_argument("--publish-host", default=None, metavar="HOST",
                        help="fanout: the publisher connects to this server instead "
                             "(e.g. another node of the same bus; default --host)")
    parser.add_argument("--publish-port", type=_port, default=None, metavar="PORT",
                        help="fanout: the publisher's server port (default --port)")
    parser.add_argument("--channel", default="bench",
                        help="fanout: channel name; soak: prefix of the channel names "
                             "(default bench)")
    parser.add_argument("--channels", type=_positive_int, default=4, metavar="N",
                        help="soak: channels NAME.0 .. NAME.(N-1) (default 4)")
    parser.add_argument("--publishers", type=_positive_int, default=4, metavar="N",
                        help="soak: publishers, each on channel (its number mod N) (default 4)")
    parser.add_argument("--pingers", type=_count, default=4, metavar="N",
                        help="soak: PING/+PONG clients, one request in flight each (default 4)")
    parser.add_argument("--fault-rate", type=_non_negative, default=1.0, metavar="PER_SECOND",
                        help="soak: misbehaving connections of each kind started per second "
                             "(a burst counts once); 0: none (default 1)")
    parser.add_argument("--max-line", type=_positive_int, default=65536, metavar="BYTES",
                        help="soak: the server's max_line, which the over-long lines exceed "
                             "(default 65536)")
    parser.add_argument("--max-rss-growth", type=_non_negative, default=10.0, metavar="PERCENT",
                        help="soak: with --server-pid, fail when the server's RSS grew more "
                             "than this from the end of the warm-up to the end (default 10)")
    parser.add_argument("--server-pid", type=_positive_int, default=None, metavar="PID",
                        help="server process: report its CPU per message and RSS "
                             "(its child processes included)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="live progress line on stderr (default: when stderr is a terminal)")


def resolve(args: argparse.Namespace) -> Options:
    """Options from parsed arguments, defaults filled in; raises UsageError."""
    wl = args.workload
    conns, inflight = DEFAULTS[wl]
    proto = "udp" if wl == "udp" else (args.proto or "tcp")
    if wl == "udp" and args.proto == "tcp":
        raise UsageError("the udp workload is UDP only (--proto tcp does not apply)")
    if wl in ("connrate", "hold", "soak") and proto == "udp":
        raise UsageError(f"{wl} is a TCP workload (--proto udp does not apply)")
    if wl == "pingpong" and args.pipeline not in (None, 1):
        raise UsageError("pingpong keeps one message in flight; use the pipeline workload")
    if wl in ("connrate", "hold", "fanout", "soak") and args.pipeline is not None:
        raise UsageError(f"--pipeline does not apply to {wl}")
    publish_host, publish_port = args.publish_host, args.publish_port
    if wl != "fanout" and (publish_host or publish_port):
        raise UsageError(f"--publish-host and --publish-port apply to fanout only, not {wl}")
    soak = wl == "soak"
    warmup = args.warmup if args.warmup is not None else (5.0 if soak else 1.0)
    opts = Options(
        workload=wl, host=args.host, proto=proto,
        port=args.port or (7070 if wl in ("fanout", "soak") else 7007),
        connections=args.connections or conns, size=args.size,
        duration=args.duration if args.duration is not None else (120.0 if soak else 5.0),
        warmup=0.0 if wl == "hold" else warmup,
        pipeline=args.pipeline or inflight, rate=args.rate, procs=args.procs,
        source_addrs=args.source_addrs, setup_timeout=args.setup_timeout,
        max_pending=args.max_pending, channel=args.channel, channels=args.channels,
        publishers=args.publishers, pingers=args.pingers, fault_rate=args.fault_rate,
        max_line=args.max_line, max_rss_growth=args.max_rss_growth, server_pid=args.server_pid,
        json=args.json,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        publish_host=publish_host, publish_port=publish_port,
    )
    if wl == "pingpong" and proto == "udp":
        opts.pipeline = 1
    udp = opts.mode == "udp"
    opts.timeout = args.timeout if args.timeout is not None else (0.5 if udp else 10.0)
    opts.grace = args.grace if args.grace is not None else (
        10.0 if wl == "hold" else 5.0 if soak else 2.0)
    if opts.duration <= 0:
        raise UsageError("--duration must be more than 0")
    if opts.timeout <= 0:
        raise UsageError("--timeout must be more than 0")
    if wl in ("fanout", "soak"):
        if not (0 < opts.rate <= 1_000_000):
            raise UsageError(f"--rate {opts.rate:g} is out of range (more than 0, at most 1000000)")
        stamp = SOAK_STAMP if soak else STAMP
        if opts.size < stamp:
            raise UsageError(f"--size {opts.size}: {wl} payloads carry a {stamp}-byte stamp, "
                             f"so at least {stamp}")
        channel = opts.channel.encode()
        longest = len(channel) + (24 if soak else 0)  # soak: NAME.slow.PROC.SERIAL
        if not (1 <= longest <= 128) or not all(chr(b) in _CHANNEL_CHARS for b in channel):
            raise UsageError(f"--channel {opts.channel!r}: 1-128 of A-Z a-z 0-9 . _ : -"
                             + (" (soak adds up to 24 more)" if soak else ""))
    if soak:
        if opts.publishers > 65535:
            raise UsageError(f"--publishers {opts.publishers} is more than 65535")
        if opts.size > min(65536, opts.max_line - 160):
            raise UsageError(f"--size {opts.size}: soak messages are at most 65536 bytes and "
                             f"160 less than --max-line")
    if udp and not UDP_HEADER + 4 <= opts.size <= UDP_MAX_SIZE:
        raise UsageError(f"--size {opts.size}: UDP datagrams here are "
                         f"{UDP_HEADER + 4}-{UDP_MAX_SIZE} bytes")
    if wl == "connrate" and opts.size > 65536:
        raise UsageError(f"--size {opts.size}: connrate sends one message of at most 65536 bytes")
    if opts.size > MAX_SIZE:
        raise UsageError(f"--size {opts.size} is more than {MAX_SIZE}")
    if opts.procs > 256:
        raise UsageError(f"--procs {opts.procs} is more than 256")
    opts.procs = min(opts.procs, opts.connections)
    try:
        infos = socket.getaddrinfo(opts.host, opts.port,
                                   type=socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {opts.host!r}: {exc.strerror}") from None
    opts.family, opts.addr = infos[0][0], infos[0][4]
    opts.publish_family, opts.publish_addr = opts.family, opts.addr
    if publish_host or publish_port:
        try:
            infos = socket.getaddrinfo(publish_host or opts.host, publish_port or opts.port,
                                       type=socket.SOCK_DGRAM if proto == "udp"
                                       else socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UsageError(f"--publish-host {publish_host!r}: {exc.strerror}") from None
        opts.publish_family, opts.publish_addr = infos[0][0], infos[0][4]
    if opts.source_addrs:
        if opts.source_addrs > 253:
            raise UsageError("--source-addrs: at most 253 (127.0.0.2 .. 127.0.0.254)")
        if opts.family != socket.AF_INET or not ipaddress.ip_address(opts.addr[0]).is_loopback:
            raise UsageError("--source-addrs needs an IPv4 loopback --host (127.x.x.x)")
        opts.sources = [f"127.0.0.{2 + i}" for i in range(opts.source_addrs)]
    per_proc = math.ceil(opts.connections / opts.procs) + (1 if wl == "fanout" else 0)
    if soak:  # publishers, pingers, and room for the fault connections
        per_proc += math.ceil((opts.publishers + opts.pingers) / opts.procs) + 256
    limit = _raise_nofile()
    if per_proc + 32 > limit:
        need = math.ceil(opts.connections / max(1, limit - 64))
        raise UsageError(f"{opts.connections} connections in {opts.procs} process(es) exceed "
                         f"the open-file limit of {limit} per process; use --procs {need} or more")
    if opts.server_pid is not None and not Path(f"/proc/{opts.server_pid}/stat").exists():
        raise UsageError(f"--server-pid {opts.server_pid}: no such process")
    return opts


_CHANNEL_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# --------------------------------------------------------------------------- client workers


class Worker:
    """One client process's share of the load: setup, then a selectors loop.

    Subclasses implement ``setup(deadline)``, ``begin(now)`` (start the load),
    ``finish(now)`` (the window is over: stop sending new messages), ``idle()``
    (nothing more is due) and optionally ``tick(now)`` (timers, timeouts).
    """

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        self.o = opts
        self.index = index
        self.ids = ids
        self.sel = selectors.DefaultSelector()
        self.c: dict[str, int] = collections.defaultdict(int)
        for name in ("sent", "received", "verified", "window", *ERRORS):
            self.c[name] = 0
        self.hist = Histogram()
        self.ws = self.we = self.hard_end = 0
        self.sending = False
        self.next_tick = 0
        self.first_error = ""
        self.interrupted = False
        self.ctl_fd = -1
        self.ctl_closed = False
        self.timeout_ns = int(opts.timeout * 1e9)

    # -- setup helpers

    def tcp_socket(self, conn_id: int) -> socket.socket:
        """A non-blocking TCP socket, bound to the connection's source address if asked."""
        sock = socket.socket(self.o.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.o.sources:
                sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
                sock.bind((self.o.sources[conn_id % len(self.o.sources)], 0))
        except OSError:
            sock.close()
            raise
        return sock

    def note_error(self, counter: str, what: Any = None) -> None:
        """Count an error; the first one's text is kept for the report."""
        self.c[counter] += 1
        if not self.first_error and what is not None:
            if isinstance(what, int):
                what = os.strerror(what)
            elif isinstance(what, OSError):
                what = what.strerror or str(what)
            self.first_error = f"{counter.replace('_', ' ')}: {what}"

    def connect_many(self, ids: Iterable[int], on_open: Callable[[socket.socket, int], None],
                     deadline: int) -> None:
        """Open TCP connections for ``ids``, at most ``max_pending`` connects at once."""
        pending: dict[socket.socket, int] = {}
        todo = iter(ids)
        more = True
        sel = self.sel
        while True:
            while more and len(pending) < self.o.max_pending:
                cid = next(todo, None)
                if cid is None:
                    more = False
                    break
                try:
                    sock = self.tcp_socket(cid)
                except OSError as exc:
                    self.note_error("connect_errors", exc)
                    continue
                rc = sock.connect_ex(self.o.addr)
                if rc in (0, errno.EINPROGRESS):
                    pending[sock] = cid
                    sel.register(sock, WRITE, None)
                else:
                    self.note_error("connect_errors", rc)
                    sock.close()
            if not pending:
                return
            now = now_ns()
            if now >= deadline:
                for sock in pending:
                    self.note_error("connect_errors", "setup timed out")
                    sel.unregister(sock)
                    sock.close()
                return
            for key, mask in sel.select(min(0.5, (deadline - now) / 1e9)):
                if key.data is not None:
                    key.data(mask)
                    continue
                sock = key.fileobj
                cid = pending.pop(sock)
                sel.unregister(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.note_error("connect_errors", err)
                    sock.close()
                else:
                    on_open(sock, cid)

    # -- the subclass interface

    def setup(self, deadline: int) -> None:
        """Open connections (bounded by ``deadline``, ns)."""

    def begin(self, now: int) -> None:
        """Start sending."""

    def finish(self, now: int) -> None:
        """The window is over: send nothing new."""

    def idle(self) -> bool:
        """Nothing is outstanding."""
        return True

    def tick(self, now: int) -> None:
        """Periodic work; set ``self.next_tick``."""
        self.next_tick = now + 1_000_000_000

    def close(self) -> None:
        """Close every socket."""
        for key in list(self.sel.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self.sel.close()

    def ready_info(self) -> dict[str, Any]:
        """What the parent learns after setup."""
        return {"connected": self.c["connected"], "first_error": self.first_error}

    def snapshot(self) -> dict[str, Any]:
        """Counters and histogram so far."""
        return {"c": dict(self.c), "h": self.hist.state(), "first_error": self.first_error,
                "interrupted": self.interrupted, "t": now_ns()}

    # -- the loop

    def run(self, t0: int, ctl: int, report: Callable[[str, Any], None]) -> None:
        """Warm up from ``t0`` (ns), measure, drain; report a snapshot every 0.5 s."""
        o = self.o
        self.ws = t0 + int(o.warmup * 1e9)
        self.we = self.ws + int(o.duration * 1e9)
        self.hard_end = self.we + int(o.grace * 1e9)
        self.ctl_fd = ctl
        self.sel.register(ctl, READ, self._on_ctl)
        self.sending = True
        now = now_ns()
        while now < t0:
            time.sleep((t0 - now) / 1e9)
            now = now_ns()
        self.begin(now)
        next_report = now + REPORT_NS
        select = self.sel.select
        while True:
            now = now_ns()
            if self.sending and now >= self.we:
                self.sending = False
                self.hard_end = min(self.hard_end, now + int(o.grace * 1e9))
                self.finish(now)
            if not self.sending and (now >= self.hard_end or self.idle()):
                break
            if now >= next_report:
                report("snap", self.snapshot())
                next_report = now + REPORT_NS
            if now >= self.next_tick:
                self.tick(now)
            wake = min(next_report, self.next_tick, self.we if self.sending else self.hard_end)
            for key, mask in select(max(0.0, (wake - now) / 1e9)):
                key.data(mask)
        self.expire()

    def expire(self) -> None:
        """The run is over: count what is still unanswered."""

    def _on_ctl(self, mask: int) -> None:
        try:
            data = os.read(self.ctl_fd, 64)
        except OSError:
            data = b""
        if not data:  # the parent closed the pipe: stop now (Ctrl-C, or the parent died)
            self.ctl_closed = True
            self.sel.unregister(self.ctl_fd)
            now = now_ns()
            if self.sending:
                self.interrupted = True
                self.we = min(self.we, now)
            self.hard_end = min(self.hard_end, now + int(self.o.grace * 1e9))


# -- TCP echo: pingpong, pipeline, hold


class EchoConn:
    """One TCP connection of the echo workloads, ``k`` messages in flight."""

    __slots__ = ("w", "sock", "base", "sent", "rbytes", "rdone", "times", "out", "alive")

    def __init__(self, worker: EchoWorker, sock: socket.socket, conn_id: int) -> None:
        self.w = worker
        self.sock = sock
        self.base = worker.payloads.start(conn_id) * worker.size
        self.sent = self.rbytes = self.rdone = 0
        self.times: collections.deque[int] = collections.deque()
        self.out: bytes | None = None
        self.alive = True

    def send(self, n: int, now: int) -> None:
        """Send the next ``n`` messages of this connection's stream."""
        w = self.w
        size = w.size
        p = w.payloads
        off = (self.base + self.sent * size) % p.ring_len
        chunk = p.view[off:off + n * size]
        self.sent += n
        w.n_sent += n
        w.outstanding += n
        if n == 1:
            self.times.append(now)
        else:
            self.times.extend([now] * n)
        if self.out is not None:
            self.out += bytes(chunk)
            return
        try:
            done = self.sock.send(chunk)
        except BlockingIOError:
            done = 0
        except OSError as exc:
            w.fail(self, "resets", exc)
            return
        if done < len(chunk):
            self.out = bytes(chunk[done:])
            w.sel.modify(self.sock, READ | WRITE, self.on_event)

    def flush(self) -> None:
        """Send what a full socket buffer held back."""
        try:
            done = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.w.fail(self, "resets", exc)
            return
        if done < len(self.out):
            self.out = self.out[done:]
        else:
            self.out = None
            self.w.sel.modify(self.sock, READ, self.on_event)

    def on_event(self, mask: int) -> None:
        """Readable (and maybe writable): check the echoed bytes, send the next messages."""
        w = self.w
        if mask & WRITE and self.out is not None:
            self.flush()
            if not self.alive:
                return
        if not mask & READ:
            return
        size = w.size
        due = self.sent * size - self.rbytes  # asking for what is due keeps buffers small
        try:
            data = self.sock.recv(65536 if due > 65536 else due or 1)
        except BlockingIOError:
            return
        except OSError as exc:
            w.fail(self, "resets", exc)
            return
        now = now_ns()
        if not data:
            w.fail(self, "resets", "connection closed by the server")
            return
        p = w.payloads
        rbytes = self.rbytes + len(data)
        if rbytes > self.sent * size or not p.ring2.startswith(
                data, (self.base + self.rbytes) % p.ring_len):
            bad = rbytes // size - self.rdone  # complete messages in a chunk that differs
            w.n_received += bad
            w.n_bad += bad
            self.rdone += bad
            w.fail(self, "mismatches", "echoed bytes differ from the bytes sent")
            return
        self.rbytes = rbytes
        n = rbytes // size - self.rdone
        if not n:
            return
        self.rdone += n
        times = self.times
        if w.ws <= now < w.we:
            if n == 1:
                w.hist.record(now - times.popleft())
            else:
                record = w.hist.record
                for _ in range(n):
                    record(now - times.popleft())
            w.n_window += n
        else:
            for _ in range(n):
                times.popleft()
        w.n_received += n
        w.outstanding -= n
        if w.sending:
            self.send(n, now)


class EchoWorker(Worker):
    """pingpong and pipeline (``pipeline`` messages in flight), and hold (idle, then one ping)."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        self.size = opts.size
        self.k = opts.pipeline
        self.payloads = Payloads(opts.size, opts.size * (self.k + 1))
        self.conns: dict[int, EchoConn] = {}
        self.outstanding = 0
        self.n_sent = self.n_received = self.n_bad = self.n_window = 0  # cheaper than self.c
        self.hold = opts.workload == "hold"

    def setup(self, deadline: int) -> None:
        self.connect_many(self.ids, self._opened, deadline)

    def _opened(self, sock: socket.socket, conn_id: int) -> None:
        conn = EchoConn(self, sock, conn_id)
        self.conns[sock.fileno()] = conn
        self.c["connected"] += 1
        self.sel.register(sock, READ, conn.on_event)

    def begin(self, now: int) -> None:
        self.next_tick = now + 200_000_000
        if self.hold:
            return
        for conn in list(self.conns.values()):
            if conn.alive:
                conn.send(self.k, now)

    def finish(self, now: int) -> None:
        if self.hold:  # the hold is over: every connection must still answer
            self.ws, self.we = now, self.hard_end + 1
            for conn in list(self.conns.values()):
                if conn.alive:
                    conn.send(1, now)

    def idle(self) -> bool:
        return self.outstanding == 0

    def tick(self, now: int) -> None:
        limit = now - self.timeout_ns
        for conn in list(self.conns.values()):
            if conn.times and conn.times[0] < limit:
                self.fail(conn, "timeouts", f"no reply within {self.o.timeout:g} s")
        self.next_tick = now + 200_000_000

    def expire(self) -> None:
        for conn in list(self.conns.values()):
            if conn.times:
                self.fail(conn, "timeouts", "no reply before the run ended")

    def fail(self, conn: EchoConn, counter: str, what: Any) -> None:
        """Count the error and drop the connection; its messages in flight are abandoned."""
        if not conn.alive:
            return
        conn.alive = False
        self.note_error(counter, what)
        self.c["abandoned"] += len(conn.times)
        self.outstanding -= len(conn.times)
        conn.times.clear()
        self.conns.pop(conn.sock.fileno(), None)
        self.sel.unregister(conn.sock)
        conn.sock.close()

    def snapshot(self) -> dict[str, Any]:
        c = self.c
        c["open"] = len(self.conns)
        c["sent"] = self.n_sent
        c["received"] = self.n_received
        c["verified"] = self.n_received - self.n_bad
        c["window"] = self.n_window
        return super().snapshot()


# -- connrate


class RateSlot:
    """One connector of the connrate workload: connect, one echo, close, again."""

    __slots__ = ("w", "slot", "sock", "cycle", "got", "t0", "reading")

    def __init__(self, worker: ConnRateWorker, slot: int) -> None:
        self.w = worker
        self.slot = slot
        self.sock: socket.socket | None = None
        self.cycle = 0
        self.got = 0
        self.t0 = 0
        self.reading = False

    def start(self, now: int) -> None:
        """Begin a cycle: a non-blocking connect."""
        w = self.w
        self.cycle += 1
        self.got = 0
        self.t0 = now
        self.reading = False
        try:
            sock = w.tcp_socket(self.slot * 7919 + self.cycle)
        except OSError as exc:
            w.retry(self, "connect_errors", exc)
            return
        rc = sock.connect_ex(w.o.addr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            w.retry(self, "connect_errors", rc)
            return
        self.sock = sock
        w.active += 1
        w.sel.register(sock, WRITE, self.on_event)

    def offset(self) -> int:
        """Where this cycle's message starts in the payload ring."""
        p = self.w.payloads
        return ((self.slot * 131 + self.cycle) % p.count) * p.size

    def on_event(self, mask: int) -> None:
        """Connected (send the message) or readable (check the echo; close when whole)."""
        w = self.w
        sock = self.sock
        if not self.reading:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.end()
                w.retry(self, "connect_errors", err)
                return
            w.c["connects"] += 1
            off = self.offset()
            try:
                sock.send(w.payloads.view[off:off + w.size])  # a fresh socket takes it whole
            except OSError as exc:
                self.end()
                w.retry(self, "resets", exc)
                return
            w.c["sent"] += 1
            self.reading = True
            w.sel.modify(sock, READ, self.on_event)
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end()
            w.retry(self, "resets", exc)
            return
        now = now_ns()
        if not data:
            self.end()
            w.retry(self, "resets", "connection closed before the echo")
            return
        p = w.payloads
        if self.got + len(data) > w.size or not p.ring2.startswith(data, self.offset() + self.got):
            self.end()
            w.c["received"] += 1
            w.retry(self, "mismatches", "echoed bytes differ from the bytes sent")
            return
        self.got += len(data)
        if self.got < w.size:
            return
        self.end()
        c = w.c
        c["received"] += 1
        c["verified"] += 1
        if w.ws <= now < w.we:
            w.hist.record(now - self.t0)
            c["window"] += 1
        if w.sending:
            self.start(now)

    def end(self) -> None:
        """Close this cycle's socket."""
        if self.sock is not None:
            self.w.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
            self.w.active -= 1


class ConnRateWorker(Worker):
    """connrate: ``connections`` connectors, each looping connect, one echo, close."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        self.size = opts.size
        self.payloads = Payloads(opts.size, opts.size)
        self.slots = [RateSlot(self, i) for i in ids]
        self.active = 0
        self.waiting: list[RateSlot] = []

    def setup(self, deadline: int) -> None:
        self.c["connected"] = len(self.slots)  # connrate connects during the run

    def begin(self, now: int) -> None:
        self.next_tick = now + 50_000_000
        for slot in self.slots:
            slot.start(now)

    def retry(self, slot: RateSlot, counter: str, what: Any) -> None:
        """Count an error; the slot starts again at the next tick (no busy loop on refusals)."""
        self.note_error(counter, what)
        self.waiting.append(slot)

    def idle(self) -> bool:
        return self.active == 0

    def expire(self) -> None:
        for slot in self.slots:
            if slot.sock is not None:
                slot.end()
                self.note_error("timeouts", "no echo before the run ended")

    def tick(self, now: int) -> None:
        waiting, self.waiting = self.waiting, []
        if self.sending:
            for slot in waiting:
                slot.start(now)
        limit = now - self.timeout_ns
        for slot in self.slots:
            if slot.sock is not None and slot.t0 < limit:
                slot.end(None)
                self.retry(slot, "timeouts", f"no echo within {self.o.timeout:g} s")
        self.next_tick = now + 50_000_000


# -- UDP


class UdpSock:
    """One connected UDP socket with ``k`` datagrams outstanding."""

    __slots__ = ("w", "sock", "seq", "pending")

    def __init__(self, worker: UdpWorker, sock: socket.socket, conn_id: int) -> None:
        self.w = worker
        self.sock = sock
        self.seq = conn_id * 1_000_003
        self.pending: dict[int, int] = {}

    def send_one(self, now: int) -> None:
        """Send the next datagram: 8 hex digits of sequence, then letters that depend on it."""
        w = self.w
        seq = self.seq & 0xFFFFFFFF
        self.seq += 1
        self.pending[seq] = now
        w.c["sent"] += 1
        w.outstanding += 1
        try:
            self.sock.send(b"%08x" % seq + w.fills[seq % 26])
        except BlockingIOError:
            pass  # not answered: it will time out and count as lost
        except OSError as exc:  # e.g. ECONNREFUSED: nothing listens on that port
            w.note_error("resets", exc)

    def on_event(self, mask: int) -> None:
        """Datagrams back: match each with what was sent."""
        w = self.w
        sock = self.sock
        pending = self.pending
        size = w.size
        fill = w.fills
        c = w.c
        for _ in range(64):
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionRefusedError as exc:
                w.note_error("resets", exc)
                return
            except OSError as exc:
                w.note_error("resets", exc)
                return
            now = now_ns()
            try:
                seq = int(data[:UDP_HEADER], 16)
            except ValueError:
                seq = -1
            sent = pending.pop(seq, None)
            if sent is None:
                if seq < 0 or len(data) != size:
                    w.note_error("mismatches", "a datagram that was never sent came back")
                else:
                    c["late"] += 1  # the answer to a datagram already counted as lost
                continue
            w.outstanding -= 1
            c["received"] += 1
            if len(data) != size or not data.endswith(fill[seq % 26]):
                w.note_error("mismatches", "echoed datagram differs from the one sent")
            else:
                c["verified"] += 1
                if w.ws <= now < w.we:
                    w.hist.record(now - sent)
                    c["window"] += 1
            if w.sending:
                self.send_one(now)


class UdpWorker(Worker):
    """udp: ``connections`` sockets, ``pipeline`` datagrams outstanding on each."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        self.size = opts.size
        self.fills = fills(opts.size - UDP_HEADER)
        self.socks: list[UdpSock] = []
        self.outstanding = 0
        self.scan_ns = int(min(0.25, max(0.01, opts.timeout / 10)) * 1e9)

    def setup(self, deadline: int) -> None:
        for cid in self.ids:
            sock = socket.socket(self.o.family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                if self.o.sources:
                    sock.bind((self.o.sources[cid % len(self.o.sources)], 0))
                sock.connect(self.o.addr)
            except OSError as exc:
                sock.close()
                self.note_error("connect_errors", exc)
                continue
            us = UdpSock(self, sock, cid)
            self.socks.append(us)
            self.c["connected"] += 1
            self.sel.register(sock, READ, us.on_event)

    def begin(self, now: int) -> None:
        self.next_tick = now + self.scan_ns
        for us in self.socks:
            for _ in range(self.o.pipeline):
                us.send_one(now)

    def idle(self) -> bool:
        return self.outstanding == 0

    def expire(self) -> None:
        for us in self.socks:
            self.c["lost"] += len(us.pending)
            self.outstanding -= len(us.pending)
            us.pending.clear()

    def tick(self, now: int) -> None:
        limit = now - self.timeout_ns
        for us in self.socks:
            pending = us.pending
            while pending:
                seq, sent = next(iter(pending.items()))  # the oldest first
                if sent >= limit:
                    break
                del pending[seq]
                self.outstanding -= 1
                self.c["lost"] += 1
                if self.sending:
                    us.send_one(now)
        self.next_tick = now + self.scan_ns


# -- fanout


class Subscriber:
    """One subscriber: checks every MSG is whole, once and in order; measures delivery latency."""

    __slots__ = ("w", "sock", "buf", "subscribed", "next", "missing", "ended", "alive",
                 "sub_sent")

    def __init__(self, worker: FanoutWorker, sock: socket.socket) -> None:
        self.w = worker
        self.sock = sock
        self.buf = b""
        self.subscribed = False
        self.next = 0
        self.missing: set[int] | None = None
        self.ended = False
        self.alive = True
        self.sub_sent = 0

    def on_event(self, mask: int) -> None:
        """MSG lines arrived."""
        w = self.w
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            w.drop_sub(self, "resets", exc)
            return
        now = now_ns()
        if not data:
            w.drop_sub(self, "resets", "subscriber connection closed by the server")
            return
        if w.dgram:
            lines = data.split(b"\n")
            if not lines[-1]:
                lines.pop()
        else:
            if self.buf:
                data = self.buf + data
            lines = data.split(b"\n")
            self.buf = lines.pop()
        prefix = w.prefix
        plen = len(prefix)
        linelen = w.linelen
        fill = w.fills
        ws, we = w.ws, w.we
        record = w.hist.record
        distinct = window = dups = reorders = 0
        for line in lines:
            if len(line) != linelen or not line.startswith(prefix):
                if len(line) == linelen + 1 and line.endswith(b"\r") and line.startswith(prefix):
                    line = line[:-1]
                else:
                    self.odd_line(line)
                    continue
            try:
                seq = int(line[plen + 16:plen + 24], 16)
                stamp = int(line[plen:plen + 16], 16)
            except ValueError:
                seq = -1
            if seq < 0 or not line.endswith(fill[seq % 26]):
                w.note_error("mismatches", f"garbled message: {line[:80]!r}")
                continue
            nxt = self.next
            if seq == nxt:
                self.next = nxt + 1
                distinct += 1
            elif seq > nxt:
                if seq - nxt > 10_000_000:
                    w.note_error("mismatches", f"sequence jumped from {nxt} to {seq}")
                    continue
                if self.missing is None:
                    self.missing = set()
                self.missing.update(range(nxt, seq))
                self.next = seq + 1
                distinct += 1
            elif self.missing and seq in self.missing:
                self.missing.discard(seq)
                reorders += 1
                distinct += 1
            else:
                dups += 1
                continue
            if ws <= now < we:
                record(now - stamp)
                window += 1
        c = w.c
        c["delivered"] += distinct
        c["window"] += window
        if dups:
            c["duplicates"] += dups
        if reorders:
            c["reordered"] += reorders

    def odd_line(self, line: bytes) -> None:
        """Lines other than a well-formed MSG of our channel."""
        w = self.w
        line = line.rstrip(b"\r")
        if line == b"+OK" and not self.subscribed:
            self.subscribed = True
            w.subscribed += 1
        elif line.startswith(w.prefix + b"END."):
            if not self.ended:
                self.ended = True
                w.ended += 1
        elif line.startswith(b"MSG ") and not line.startswith(w.prefix):
            pass  # another channel's message: not ours to check
        else:
            w.note_error("protocol", f"unexpected line {line[:80]!r}")


class Publisher:
    """The one publisher: ``PUB`` at a fixed rate, each payload stamped (time, sequence)."""

    def __init__(self, worker: FanoutWorker, sock: socket.socket) -> None:
        self.w = worker
        self.sock = sock
        self.out: bytes | None = None
        self.buf = b""
        self.seq = 0
        self.acks = 0
        self.expect_acks = 0
        self.next_t = 0
        self.interval = max(1, int(1e9 / worker.o.rate))
        self.head = b"PUB " + worker.o.channel.encode() + b" "

    def send(self, line: bytes) -> None:
        """Queue one command line."""
        self.expect_acks += 1
        if self.out is not None:
            self.out += line
            return
        try:
            done = self.sock.send(line)
        except BlockingIOError:
            done = 0
        except OSError as exc:
            self.w.note_error("resets", exc)
            return
        if done < len(line):
            if self.w.dgram:
                self.w.c["lost"] += 1
                return
            self.out = line[done:]
            self.w.sel.modify(self.sock, READ | WRITE, self.on_event)

    def publish_due(self, now: int) -> None:
        """Publish every message whose time has come (catching up if late)."""
        w = self.w
        fill = w.fills
        while self.next_t <= now:
            seq = self.seq & 0xFFFFFFFF
            self.seq += 1
            self.next_t += self.interval
            self.send(self.head + b"%016x%08x" % (now_ns(), seq) + fill[seq % 26] + b"\n")
            w.c["published"] += 1
            w.c["sent"] += 1

    def on_event(self, mask: int) -> None:
        """Replies to PUB (``+OK``); or room to send."""
        w = self.w
        if mask & WRITE and self.out is not None:
            try:
                done = self.sock.send(self.out)
            except BlockingIOError:
                done = 0
            except OSError as exc:
                w.note_error("resets", exc)
                return
            self.out = self.out[done:] or None
            if self.out is None:
                w.sel.modify(self.sock, READ, self.on_event)
        if not mask & READ:
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            w.note_error("resets", exc)
            w.sel.unregister(self.sock)
            self.expect_acks = self.acks
            return
        if not data:
            w.note_error("resets", "publisher connection closed by the server")
            w.sel.unregister(self.sock)
            self.expect_acks = self.acks
            return
        data = self.buf + data
        lines = data.split(b"\n")
        self.buf = b"" if w.dgram else lines.pop()
        for line in lines:
            if line.rstrip(b"\r") == b"+OK":
                self.acks += 1
            elif line or not w.dgram:
                w.note_error("protocol", f"publisher got {line[:80]!r}")


class FanoutWorker(Worker):
    """fanout: this process's subscribers, and in process 0 the publisher."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        self.dgram = opts.proto == "udp"
        channel = opts.channel.encode()
        self.prefix = b"MSG " + channel + b" "
        self.linelen = len(self.prefix) + opts.size
        self.fills = fills(opts.size - STAMP)
        self.subs: list[Subscriber] = []
        self.live_subs = 0
        self.subscribed = 0
        self.ended = 0
        self.publisher: Publisher | None = None
        self.sub_line = b"SUB " + channel + b"\n"
        for name in ("delivered", "duplicates", "reordered", "published"):
            self.c[name] = 0

    def _new_sub(self, sock: socket.socket, conn_id: int) -> None:
        sub = Subscriber(self, sock)
        self.subs.append(sub)
        self.live_subs += 1
        self.c["connected"] += 1
        self.sel.register(sock, READ, sub.on_event)
        self._send_sub(sub)

    def _send_sub(self, sub: Subscriber) -> None:
        sub.sub_sent = now_ns()
        try:
            sub.sock.send(self.sub_line)
        except OSError as exc:
            self.drop_sub(sub, "resets", exc)

    def setup(self, deadline: int) -> None:
        o = self.o
        if self.dgram:
            for cid in self.ids:
                sock = socket.socket(o.family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                try:
                    if o.sources:
                        sock.bind((o.sources[cid % len(o.sources)], 0))
                    sock.connect(o.addr)
                except OSError as exc:
                    sock.close()
                    self.note_error("connect_errors", exc)
                    continue
                self._new_sub(sock, cid)
        else:
            self.connect_many(self.ids, self._new_sub, deadline)
        while self.subscribed < self.live_subs:
            now = now_ns()
            if now >= deadline:
                for sub in self.subs:
                    if sub.alive and not sub.subscribed:
                        self.drop_sub(sub, "timeouts", "no +OK to SUB in time")
                break
            if self.dgram:  # a datagram may be lost: ask again every 0.5 s
                for sub in self.subs:
                    if sub.alive and not sub.subscribed and now - sub.sub_sent > 500_000_000:
                        self._send_sub(sub)
            for key, mask in self.sel.select(min(0.1, (deadline - now) / 1e9)):
                key.data(mask)
        self.c["subscribers"] = self.subscribed
        if self.index == 0:
            kind = socket.SOCK_DGRAM if self.dgram else socket.SOCK_STREAM
            sock = socket.socket(o.publish_family, kind)
            sock.settimeout(max(0.1, (deadline - now_ns()) / 1e9))
            try:
                sock.connect(o.publish_addr)
            except OSError as exc:
                sock.close()
                raise RuntimeError(f"publisher cannot connect to {_publish_target(o)}: "
                                   f"{exc.strerror or exc}") from None
            sock.setblocking(False)
            if not self.dgram:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.publisher = Publisher(self, sock)
            self.sel.register(sock, READ, self.publisher.on_event)

    def drop_sub(self, sub: Subscriber, counter: str, what: Any) -> None:
        """A subscriber failed: count it and close it."""
        if not sub.alive:
            return
        sub.alive = False
        self.live_subs -= 1
        self.note_error(counter, what)
        if sub.subscribed and not sub.ended and self.c["subscribers"]:
            self.ended += 1  # nothing more will come; the parent counts what it missed as lost
        self.sel.unregister(sub.sock)
        sub.sock.close()

    def ready_info(self) -> dict[str, Any]:
        info = super().ready_info()
        info["subscribed"] = self.subscribed
        return info

    def begin(self, now: int) -> None:
        if self.publisher is not None:
            self.publisher.next_t = now
            self.publisher.publish_due(now)
            self.next_tick = self.publisher.next_t
        else:
            self.next_tick = self.hard_end

    def tick(self, now: int) -> None:
        if self.publisher is not None and self.sending:
            self.publisher.publish_due(now)
            self.next_tick = self.publisher.next_t
        else:
            self.next_tick = self.hard_end

    def finish(self, now: int) -> None:
        if self.publisher is not None:  # the end marker tells every subscriber how many came
            pub = self.publisher
            pub.send(pub.head + b"END.%d\n" % pub.seq)

    def idle(self) -> bool:
        pub = self.publisher
        if pub is not None and pub.acks < pub.expect_acks:
            return False
        return self.ended >= self.subscribed

    def expire(self) -> None:
        pub = self.publisher
        if pub is not None and pub.acks < pub.expect_acks and not self.dgram:
            self.note_error("timeouts", f"{pub.expect_acks - pub.acks} PUB(s) never answered")

    def snapshot(self) -> dict[str, Any]:
        if self.publisher is not None:
            self.c["acks"] = self.publisher.acks
        return super().snapshot()


# -- soak


class SoakConn:
    """One TCP connection of the soak workload: a non-blocking connect (or a socket connected
    during setup), writes queued while the kernel does not take them, and what arrives handed
    to :meth:`received`. Subclasses say what the bytes mean."""

    def __init__(self, worker: SoakWorker) -> None:
        self.w = worker
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.buf = b""
        self.connected = False
        self.alive = False
        self.dropped = False
        self.reading = True
        self.shut_after = False
        self.events = 0

    def open(self, conn_id: int, rcvbuf: int = 0) -> None:
        """Start a non-blocking connect (``rcvbuf``: a small receive buffer, set first)."""
        try:
            sock = self.w.tcp_socket(conn_id)
        except OSError as exc:
            self.refused(exc)
            return
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        rc = sock.connect_ex(self.w.o.addr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self.refused(rc)
            return
        self.sock = sock
        self.alive = True
        self.update()

    def adopt(self, sock: socket.socket) -> None:
        """Take a socket that is already connected."""
        self.sock = sock
        self.alive = self.connected = True
        self.update()
        self.opened(now_ns())

    def update(self) -> None:
        """Register the events this connection waits for (none while a reader is paused)."""
        if not self.alive:
            return
        events = ((WRITE if self.out or not self.connected else 0)
                  | (READ if self.reading and self.connected else 0))
        if events != self.events:
            sel = self.w.sel
            if not self.events:
                sel.register(self.sock, events, self.on_event)
            elif not events:
                sel.unregister(self.sock)
            else:
                sel.modify(self.sock, events, self.on_event)
            self.events = events

    def on_event(self, mask: int) -> None:
        """Connected, writable or readable."""
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close()
                self.refused(err)
                return
            self.connected = True
            self.update()
            self.opened(now_ns())
            return
        if mask & WRITE and self.out:
            self.flush()
        if mask & READ and self.alive and self.reading:
            try:
                data = self.sock.recv(262144)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close()
                self.lost(exc)
                return
            if data:
                self.received(data, now_ns())
            else:
                self.ended(now_ns())

    def send(self, data: bytes) -> None:
        """Send ``data`` after whatever is queued."""
        if self.alive:
            self.out += data
            if self.connected:
                self.flush()
            else:
                self.update()

    def flush(self) -> None:
        """Send what is queued, as much as the kernel takes."""
        try:
            done = self.sock.send(self.out)
        except BlockingIOError:
            done = 0
        except OSError as exc:
            self.close()
            self.lost(exc)
            return
        del self.out[:done]
        self.update()
        if not self.out and self.shut_after:
            self.half_close()

    def half_close(self) -> None:
        """Shut the write side once everything queued is sent."""
        self.shut_after = True
        if self.out or not self.alive:
            return
        self.shut_after = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.close()
            self.lost(exc)

    def close(self, reset: bool = False) -> None:
        """Close (``reset``: with SO_LINGER 0, so the server gets a reset)."""
        if not self.alive:
            return
        self.alive = False
        if self.events:
            self.w.sel.unregister(self.sock)
            self.events = 0
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def lines(self, data: bytes) -> list[bytes]:
        """The complete lines in what arrived (terminators stripped)."""
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        return lines

    # what subclasses handle

    def opened(self, now: int) -> None:
        """The connection is up."""

    def received(self, data: bytes, now: int) -> None:
        """Bytes arrived."""

    def ended(self, now: int) -> None:
        """The server closed the connection (end of file)."""
        self.close()
        self.lost("connection closed by the server")

    def lost(self, what: Any) -> None:
        """The connection failed (already closed)."""

    def refused(self, what: Any) -> None:
        """The connect failed."""
        self.w.note_error("connect_errors", what)


class Accounted(SoakConn):
    """An accounted connection: counted once connected; its failure is an error."""

    def opened(self, now: int) -> None:
        self.w.c["connected"] += 1

    def lost(self, what: Any) -> None:
        self.w.drop(self, "resets", what)


class Pinger(Accounted):
    """An accounted request/response client: ``PING <text>`` -> ``+PONG <text>``, one in
    flight, random text of 1 to ``--size`` bytes, every byte checked."""

    def __init__(self, worker: SoakWorker) -> None:
        super().__init__(worker)
        self.expect = b""
        self.got = 0
        self.t = 0

    def ping(self, now: int) -> None:
        """Send the next PING."""
        w = self.w
        text = w.text(w.rng.randint(1, w.size))
        self.expect = b"+PONG " + text + b"\n"
        self.got = 0
        self.t = now
        w.c["pings"] += 1
        self.send(b"PING " + text + b"\n")

    def received(self, data: bytes, now: int) -> None:
        w = self.w
        if not self.expect.startswith(data, self.got):
            w.drop(self, "mismatches", "the +PONG text differs from the PING text")
            return
        self.got += len(data)
        if self.got < len(self.expect):
            return
        self.expect = b""
        c = w.c
        c["round_trips"] += 1
        if w.ws <= now < w.we:
            w.hist.record(now - self.t)
            c["window"] += 1
        if w.sending:
            self.ping(now)


class SoakSub(Accounted):
    """An accounted subscriber of one or two channels. Per publisher it tracks the first
    sequence number seen, the next one due and the gaps, so that the parent can tell which
    messages published after this subscriber's ``+OK`` never came (see
    :func:`soak_accounting`); duplicates and messages out of order are counted here."""

    def __init__(self, worker: SoakWorker, sub_id: int, late: bool = False) -> None:
        super().__init__(worker)
        self.channels = worker.channels_of(sub_id)
        self.chset = set(self.channels)
        self.want = {p for ch in self.channels for p in worker.pubs_on[ch]}
        self.late = late
        self.oks: list[int] = []
        self.seqs: dict[int, list[Any]] = {}  # publisher -> [first, next, missing set or None]
        self.ends: set[int] = set()
        self.t_open = 0

    def opened(self, now: int) -> None:
        super().opened(now)
        w = self.w
        self.t_open = now
        self.send(b"".join(b"SUB " + w.names[ch] + b"\n" for ch in self.channels))

    @property
    def subscribed(self) -> bool:
        """Every SUB has its +OK."""
        return len(self.oks) == len(self.channels)

    def finished(self) -> bool:
        """Nothing more is due: every publisher's end marker came, or the connection failed."""
        return not self.alive or (self.subscribed and self.ends >= self.want)

    def received(self, data: bytes, now: int) -> None:
        w = self.w
        for line in self.lines(data):
            if line.startswith(b"MSG "):
                self.message(line, now)
            elif line.rstrip(b"\r") == b"+OK" and not self.subscribed:
                self.oks.append(now)
                if self.subscribed:
                    w.c["subscribers"] += 1
                    if self.late:
                        w.c["late_subscribers"] += 1
            else:
                w.note_error("protocol", f"subscriber got {line[:80]!r}")

    def message(self, line: bytes, now: int) -> None:
        """One MSG line: check it, then its place in its publisher's sequence."""
        w = self.w
        parsed = w.parse_msg(line)
        if isinstance(parsed, str):
            w.note_error("mismatches", parsed)
            return
        ch, pub, stamp, seq = parsed
        c = w.c
        if ch not in self.chset:  # (before its +OK is fine: MSG lines come at any time)
            w.note_error("mismatches", f"a MSG on channel {w.names[ch].decode()}, not subscribed")
            return
        if seq < 0:
            if pub in self.ends:
                c["duplicates"] += 1
            self.ends.add(pub)
            return
        st = self.seqs.get(pub)
        if st is None:
            self.seqs[pub] = [seq, seq + 1, None]
        else:
            first, nxt, missing = st
            if seq == nxt:
                st[1] = nxt + 1
            elif seq > nxt:
                if seq - nxt > 10_000_000:
                    w.note_error("mismatches",
                                 f"publisher {pub}: sequence jumped from {nxt} to {seq}")
                    return
                st[2] = missing = missing or set()
                missing.update(range(nxt, seq))
                st[1] = seq + 1
            elif missing and seq in missing:
                missing.discard(seq)
                c["reordered"] += 1
            elif seq < first:
                st[2] = missing = missing or set()
                missing.update(range(seq + 1, first))
                st[0] = seq
                c["reordered"] += 1
            else:
                c["duplicates"] += 1
                return
        c["received"] += 1
        if w.ws <= now < w.we:
            w.dhist.record(now - stamp)
            c["dwindow"] += 1

    def records(self) -> list[tuple[Any, ...]]:
        """Per (channel, publisher): (publisher, time of the +OK, first, next, gaps, end seen)."""
        out = []
        for i, ch in enumerate(self.channels):
            if i >= len(self.oks):
                continue
            for pub in self.w.pubs_on[ch]:
                first, nxt, missing = self.seqs.get(pub, (-1, -1, None))
                out.append((pub, self.oks[i], first, nxt, sorted(missing or ()),
                            pub in self.ends))
        return out


class SoakPub(Accounted):
    """An accounted publisher: ``PUB`` at a steady rate on its channel, each payload stamped
    with its publisher number, the sending time (CLOCK_MONOTONIC ns) and a sequence number;
    it keeps every stamp, so the parent can tell which messages came after a subscriber's +OK."""

    def __init__(self, worker: SoakWorker, pub: int) -> None:
        super().__init__(worker)
        o = worker.o
        self.pub = pub
        self.head = b"PUB " + worker.names[pub % o.channels] + b" "
        self.interval = max(1, int(1e9 * o.publishers / o.rate))
        self.stamps = array.array("q")
        self.seq = self.acks = self.expect = 0
        self.next_t = 0
        self.end_stamp = 0

    def publish_due(self, now: int) -> None:
        """Publish every message whose time has come (catching up if late); a timer calls it."""
        w = self.w
        if not w.sending:
            return
        fill = w.fills
        c = w.c
        while self.next_t <= now and self.alive:
            stamp = now_ns()
            seq = self.seq
            self.stamps.append(stamp)
            self.seq = seq + 1
            self.expect += 1
            self.next_t += self.interval
            c["published"] += 1
            self.send(self.head + b"%04x%016x%08x" % (self.pub, stamp, seq) + fill[seq % 26]
                      + b"\n")
        if self.alive:
            w.call_at(self.next_t, self.publish_due)

    def end(self) -> None:
        """The window is over: publish the end marker."""
        if self.alive:
            self.end_stamp = now_ns()
            self.expect += 1
            self.send(self.head + b"END.%04x\n" % self.pub)

    def received(self, data: bytes, now: int) -> None:
        for line in self.lines(data):
            if line.rstrip(b"\r") == b"+OK" and self.acks < self.expect:
                self.acks += 1
                if self.acks <= self.seq:
                    self.w.c["accepted"] += 1
            else:
                self.w.note_error("protocol", f"publisher got {line[:80]!r}")

    def record(self) -> tuple[int, bytes, bool, int]:
        """(accepted messages, their stamps, end marker accepted, its stamp)."""
        accepted = min(self.acks, self.seq)
        return (accepted, self.stamps[:accepted].tobytes(),
                bool(self.end_stamp) and self.acks > self.seq, self.end_stamp)


class Fault(SoakConn):
    """A connection that misbehaves on purpose, apart from the accounted ones. It ends with
    an outcome: ``ok`` (the server did what it promises), ``shed`` (the server closed or
    trimmed it, as it may) or ``failed`` (counted as an error)."""

    kind = ""
    rcvbuf = 0
    wait_close = False  # once answered, wait for the server's close

    def __init__(self, worker: SoakWorker, now: int) -> None:
        super().__init__(worker)
        self.deadline = now + worker.timeout_ns
        self.token = b"%016x" % worker.rng.getrandbits(64)
        self.expect = b""
        self.got = 0

    def start(self) -> None:
        """Connect."""
        self.open(self.w.next_serial(), self.rcvbuf)

    def finish(self, outcome: str, counter: str | None = None, what: Any = None,
               reset: bool = False) -> None:
        """Count the outcome (and an error, if ``counter``) and close."""
        w = self.w
        if self not in w.faults:
            return
        w.faults.discard(self)
        self.close(reset)
        w.c[f"fault.{self.kind}.{outcome}"] += 1
        if counter:
            w.note_error(counter, f"{self.kind}: {what}" if counter == "faults" else what)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` continues the expected reply (if not, the fault failed)."""
        if not self.expect.startswith(data, self.got):
            self.finish("failed", "mismatches",
                        f"{self.kind}: the reply differs from {self.expect[:40]!r}...")
            return False
        self.got += len(data)
        return True

    @property
    def answered(self) -> bool:
        """The whole expected reply came."""
        return self.got == len(self.expect)

    def ping(self, send: bool = True) -> bytes:
        """Expect the +PONG of a PING of this fault's token; send it (and return it)."""
        self.expect = b"+PONG " + self.token + b"\n"
        line = b"PING " + self.token + b"\n"
        if send:
            self.send(line)
        return line

    def received(self, data: bytes, now: int) -> None:
        if self.matches(data) and self.answered and not self.wait_close:
            self.reply_done(now)

    def reply_done(self, now: int) -> None:
        """The whole expected reply came."""
        self.finish("ok")

    def refused(self, what: Any) -> None:
        self.finish("failed", "connect_errors", what)

    def lost(self, what: Any) -> None:
        self.finish("failed", "faults", what)

    def ended(self, now: int) -> None:
        self.finish("failed", "faults", "closed by the server")


class ResetMidWrite(Fault):
    """After one PING round trip, half a PUB line to an accounted channel, then a reset: the
    server must drop the unfinished line (a subscriber would catch it as a garbled MSG)."""

    kind = "reset_write"

    def opened(self, now: int) -> None:
        self.ping()

    def reply_done(self, now: int) -> None:
        self.send(b"PUB " + self.w.names[0] + b" half-written " + self.w.text(8192))
        self.finish("ok", reset=True)


class ResetMidRead(Fault):
    """With a small receive buffer, 16 PINGs of 8 KB; after the first 16 KB of replies (all
    checked), a reset while the server still has replies to write."""

    kind = "reset_read"
    rcvbuf = 8192

    def opened(self, now: int) -> None:
        text = self.w.text(8192)
        self.expect = (b"+PONG " + text + b"\n") * 16
        self.send((b"PING " + text + b"\n") * 16)

    def received(self, data: bytes, now: int) -> None:
        if self.matches(data) and self.got >= 16384:
            self.finish("ok", reset=True)


class HalfClose(Fault):
    """Two PINGs, then shut the write side: both answers must come, then the server's close."""

    kind = "half_close"
    wait_close = True

    def opened(self, now: int) -> None:
        t = self.token
        self.expect = b"+PONG a" + t + b"\n+PONG b" + t + b"\n"
        self.send(b"PING a" + t + b"\nPING b" + t + b"\n")
        self.half_close()

    def ended(self, now: int) -> None:
        if self.answered:
            self.finish("ok")
        else:
            self.finish("failed", "faults", f"closed after {self.got} of {len(self.expect)} "
                                            "bytes of the answers")


class Garbage(Fault):
    """Random binary bytes (up to 2 KB, any line that would be a PUB defused), then a PING:
    one reply line per line sent (``+OK``, ``+PONG`` or ``-ERR``), the PING's last."""

    kind = "garbage"

    def opened(self, now: int) -> None:
        w = self.w
        data = w.rng.randbytes(w.rng.randint(1, max(1, min(2048, w.o.max_line // 2))))
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if line.partition(b" ")[0].upper() == b"PUB":
                lines[i] = b"\0" + line
        data = b"\n".join(lines) + b"\nPING " + self.token + b"\n"
        self.want = data.count(b"\n")
        self.replies = 0
        self.send(data)

    def received(self, data: bytes, now: int) -> None:
        for line in self.lines(data):
            if line.startswith(b"MSG "):
                continue
            if not line.startswith((b"+OK", b"+PONG", b"-ERR")):
                self.finish("failed", "faults", f"reply {line[:60]!r}")
                return
            self.replies += 1
            if line == b"+PONG " + self.token:
                if self.replies == self.want:
                    self.finish("ok")
                else:
                    self.finish("failed", "faults",
                                f"{self.replies} replies to {self.want} lines")
                return


class LongLine(Fault):
    """A line longer than ``--max-line``: ``-ERR line too long``, then the server's close."""

    kind = "long_line"
    wait_close = True

    def opened(self, now: int) -> None:
        self.expect = b"-ERR line too long\n"
        self.send(b"x" * (self.w.o.max_line + 2))

    def ended(self, now: int) -> None:
        self.lost("closed without -ERR line too long")

    def lost(self, what: Any) -> None:
        if self.answered:  # a reset after the reply is a close too
            self.finish("ok")
        else:
            self.finish("failed", "faults", what)


class BurstPing(Fault):
    """One of ``BURST`` connections opened at once: a PING, its answer, a close."""

    kind = "burst"

    def opened(self, now: int) -> None:
        self.ping()


class Dribble(Fault):
    """A PING sent two bytes every 100 ms (slowloris): it must be answered, unless the server
    closes a client this slow (idle_timeout), which counts as shed."""

    kind = "dribble"

    def opened(self, now: int) -> None:
        self.rest = self.ping(send=False)
        self.step(now)

    def step(self, now: int) -> None:
        """Send the next two bytes."""
        if self.alive:
            self.send(self.rest[:2])
            self.rest = self.rest[2:]
            if self.rest:
                self.w.call_at(now + 100_000_000, self.step)

    def ended(self, now: int) -> None:
        self.finish("shed")

    def lost(self, what: Any) -> None:
        self.finish("shed")


class SlowReader(Fault):
    """A subscriber that stops reading (small receive buffer) while a feeder connection
    publishes ``SLOW_BYTES`` to its private channel; every PUB must still be answered (a slow
    reader stalls no one). Then it reads again and sends a PING: the server shed it (closed
    it, or dropped messages for it) or kept them all."""

    kind = "slow_reader"
    rcvbuf = 4096

    def __init__(self, worker: SoakWorker, now: int) -> None:
        super().__init__(worker, now)
        w = worker
        self.chan = b"%s.slow.%d.%d" % (w.o.channel.encode(), w.index, w.next_serial())
        size = max(1, min(32768, w.o.max_line - len(self.chan) - 8))
        payload = w.text(size)
        self.pub_line = b"PUB " + self.chan + b" " + payload + b"\n"
        self.msg_line = b"MSG " + self.chan + b" " + payload
        self.n = max(1, min(2000, SLOW_BYTES // size))
        self.msgs = 0
        self.draining = False
        self.feeder: SlowFeeder | None = None

    def opened(self, now: int) -> None:
        self.send(b"SUB " + self.chan + b"\n")

    def received(self, data: bytes, now: int) -> None:
        for line in self.lines(data):
            if not self.draining and self.feeder is None and line == b"+OK":
                self.reading = False  # stop reading; the feeder starts publishing
                self.update()
                self.feeder = SlowFeeder(self)
                self.feeder.open(self.w.next_serial())
            elif self.draining and line == self.msg_line:
                self.msgs += 1
            elif self.draining and line == b"-ERR slow consumer":
                pass
            elif self.draining and line == b"+PONG " + self.token:
                self.finish("ok" if self.msgs == self.n else "shed")
                return
            else:
                self.finish("failed", "faults", f"got {line[:60]!r}")
                return

    def fed(self, now: int) -> None:
        """Every PUB was answered: read again, then PING to learn what the server kept."""
        self.draining = True
        self.reading = True
        self.update()
        self.send(b"PING " + self.token + b"\n")

    def ended(self, now: int) -> None:
        self.lost("closed by the server")

    def lost(self, what: Any) -> None:
        if self.draining:
            self.finish("shed")  # the server disconnected the slow consumer
        else:
            self.finish("failed", "faults", what)

    def finish(self, outcome: str, counter: str | None = None, what: Any = None,
               reset: bool = False) -> None:
        if self.feeder is not None:
            self.feeder.close()
        super().finish(outcome, counter, what, reset)


class SlowFeeder(SoakConn):
    """A slow reader's publisher: one PUB at a time, each answered before the next."""

    def __init__(self, reader: SlowReader) -> None:
        super().__init__(reader.w)
        self.reader = reader
        self.acks = 0

    def opened(self, now: int) -> None:
        self.send(self.reader.pub_line)

    def received(self, data: bytes, now: int) -> None:
        reader = self.reader
        for line in self.lines(data):
            if line != b"+OK":
                reader.finish("failed", "faults", f"the feeder got {line[:60]!r}")
                return
            self.acks += 1
            if self.acks == reader.n:
                self.close()
                reader.fed(now)
                return
            self.send(reader.pub_line)

    def ended(self, now: int) -> None:
        self.lost("closed by the server")

    def lost(self, what: Any) -> None:
        self.reader.finish("failed", "faults", f"feeder: {what}")

    def refused(self, what: Any) -> None:
        self.reader.finish("failed", "connect_errors", what)


class SubChurn(Fault):
    """SUB an accounted channel, take its messages (checked) for 0.3 s, UNSUB, SUB again and
    reset while subscribed."""

    kind = "sub_churn"

    def __init__(self, worker: SoakWorker, now: int) -> None:
        super().__init__(worker, now)
        self.ch = worker.rng.randrange(worker.o.channels)
        self.oks = 0

    def opened(self, now: int) -> None:
        self.send(b"SUB " + self.w.names[self.ch] + b"\n")

    def received(self, data: bytes, now: int) -> None:
        w = self.w
        for line in self.lines(data):
            if line.startswith(b"MSG "):
                parsed = w.parse_msg(line)
                if isinstance(parsed, str) or parsed[0] != self.ch:
                    self.finish("failed", "mismatches", parsed if isinstance(parsed, str) else
                                f"a MSG for channel {parsed[0]}, not {self.ch}")
                    return
            elif line == b"+OK":
                self.oks += 1
                if self.oks == 1:
                    w.call_at(now + 300_000_000, self.unsubscribe)
                elif self.oks == 2:
                    self.send(b"SUB " + w.names[self.ch] + b"\n")
                else:
                    self.finish("ok", reset=True)
                    return
            else:
                self.finish("failed", "faults", f"got {line[:60]!r}")
                return

    def unsubscribe(self, now: int) -> None:
        """Time to UNSUB."""
        self.send(b"UNSUB " + self.w.names[self.ch] + b"\n")


FAULTS: dict[str, type[Fault]] = {
    cls.kind: cls for cls in (ResetMidWrite, ResetMidRead, HalfClose, Garbage, LongLine,
                              BurstPing, SlowReader, Dribble, SubChurn)
}
BURST = 10  # connections a burst opens at once
SLOW_BYTES = 8 << 20  # what a slow reader's feeder publishes: more than the kernel buffers
SOAK_STAMP = 28  # soak payload header: 4 hex digits of publisher, 16 of time, 8 of sequence
SOAK_COUNTS = ("connected", "subscribers", "late_subscribers", "published", "accepted",
               "received", "dwindow", "duplicates", "reordered", "pings", "round_trips",
               "faults")


class SoakWorker(Worker):
    """soak: this process's share of subscribers, publishers, pingers and faults."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        o = opts
        self.size = o.size
        self.names = [f"{o.channel}.{i}".encode() for i in range(o.channels)]
        self.channel_index = {name: i for i, name in enumerate(self.names)}
        self.pubs_on = [[p for p in range(o.publishers) if p % o.channels == ch]
                        for ch in range(o.channels)]
        self.fills = fills(o.size - SOAK_STAMP)
        self.payloads = Payloads(o.size, 16384)
        self.rng = random.Random(7070 + index)
        self.timers: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self.serial = 0
        self.subs: list[SoakSub] = []
        self.pubs: list[SoakPub] = []
        self.pingers: list[Pinger] = []
        self.faults: set[Fault] = set()
        self.dhist = Histogram()
        self.next_check = 0
        self.done = False
        for name in SOAK_COUNTS:
            self.c[name] = 0
        for kind in FAULTS:
            for outcome in ("run", "ok", "shed", "failed"):
                self.c[f"fault.{kind}.{outcome}"] = 0

    # -- helpers for the connections

    def channels_of(self, sub_id: int) -> list[int]:
        """A subscriber's channels: one, and for odd ones the next channel too."""
        n = self.o.channels
        ch = sub_id % n
        return [ch, (ch + 1) % n] if n > 1 and sub_id % 2 else [ch]

    def text(self, n: int) -> bytes:
        """``n`` random letters and digits (n <= 65536)."""
        p = self.payloads
        off = self.rng.randrange(p.ring_len)
        return p.ring2[off:off + n]

    def next_serial(self) -> int:
        """A number for a fault connection (its source address, its channel name)."""
        self.serial += 1
        return self.serial

    def call_at(self, t: int, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(now, *args)`` at ``t`` (ns) from the loop."""
        self.serial += 1
        heapq.heappush(self.timers, (t, self.serial, fn, args))
        self.next_tick = min(self.next_tick, t)

    def parse_msg(self, line: bytes) -> tuple[int, int, int, int] | str:
        """A ``MSG`` line -> (channel, publisher, stamp, sequence; -1 for an end marker), or
        what is wrong with it."""
        i = line.find(b" ", 4)
        ch = self.channel_index.get(line[4:i]) if i > 0 else None
        if ch is None:
            return f"a MSG on a channel no one subscribed to: {line[:60]!r}"
        payload = line[i + 1:]
        stamp = seq = -1
        try:
            if payload.startswith(b"END."):
                pub = int(payload[4:], 16)
                good = payload == b"END.%04x" % pub
            else:
                pub = int(payload[:4], 16)
                stamp = int(payload[4:20], 16)
                seq = int(payload[20:SOAK_STAMP], 16)
                good = (len(payload) == self.size and payload[SOAK_STAMP:] == self.fills[seq % 26]
                        and payload[:SOAK_STAMP] == b"%04x%016x%08x" % (pub, stamp, seq))
        except ValueError:
            good = False
        if not good:
            return f"garbled message: {line[:60]!r}"
        if pub >= self.o.publishers or pub % self.o.channels != ch:
            return f"publisher {pub}'s message on channel {self.names[ch].decode()}"
        return ch, pub, stamp, seq

    def drop(self, conn: SoakConn, counter: str, what: Any) -> None:
        """An accounted connection failed: count it and close it."""
        if not conn.dropped:
            conn.dropped = True
            self.note_error(counter, what)
        conn.close()

    # -- the Worker interface

    def setup(self, deadline: int) -> None:
        o = self.o
        self.connect_many([j for j in self.ids if j % 4 != 3], self._sub_opened, deadline)
        self.connect_many(range(self.index, o.publishers, o.procs), self._pub_opened, deadline)
        self.connect_many(range(self.index, o.pingers, o.procs), self._ping_opened, deadline)
        while any(s.alive and not s.subscribed for s in self.subs):
            now = now_ns()
            if now >= deadline:
                for sub in self.subs:
                    if sub.alive and not sub.subscribed:
                        self.drop(sub, "timeouts", "no +OK to SUB in time")
                break
            for key, mask in self.sel.select(min(0.1, (deadline - now) / 1e9)):
                key.data(mask)

    def _sub_opened(self, sock: socket.socket, sub_id: int) -> None:
        sub = SoakSub(self, sub_id)
        self.subs.append(sub)
        sub.adopt(sock)

    def _pub_opened(self, sock: socket.socket, pub: int) -> None:
        publisher = SoakPub(self, pub)
        self.pubs.append(publisher)
        publisher.adopt(sock)

    def _ping_opened(self, sock: socket.socket, conn_id: int) -> None:
        pinger = Pinger(self)
        self.pingers.append(pinger)
        pinger.adopt(sock)

    def begin(self, now: int) -> None:
        o = self.o
        self.next_tick = now
        for i, pub in enumerate(self.pubs):
            pub.next_t = now + i * pub.interval // len(self.pubs)
            self.call_at(pub.next_t, pub.publish_due)
        for pinger in self.pingers:
            if pinger.alive:
                pinger.ping(now)
        if o.fault_rate > 0:
            interval = int(o.procs / o.fault_rate * 1e9)
            slots = len(FAULTS) * o.procs
            for i, kind in enumerate(FAULTS):  # spread the kinds and processes over an interval
                at = now + interval * (i * o.procs + self.index) // slots
                self.call_at(at, self._fault_due, kind, interval, at)
        span = int((o.warmup + o.duration) / 2 * 1e9)
        for sub_id in self.ids:
            if sub_id % 4 == 3:
                self.call_at(now + self.rng.randrange(span + 1), self._late_sub, sub_id)

    def _late_sub(self, now: int, sub_id: int) -> None:
        if self.sending:
            sub = SoakSub(self, sub_id, late=True)
            self.subs.append(sub)
            sub.open(sub_id)

    def _fault_due(self, now: int, kind: str, interval: int, at: int) -> None:
        if not self.sending:
            return
        for _ in range(BURST if kind == "burst" else 1):
            fault = FAULTS[kind](self, now)
            self.faults.add(fault)
            self.c[f"fault.{kind}.run"] += 1
            fault.start()
        at = max(at + interval, now)
        self.call_at(at, self._fault_due, kind, interval, at)

    def tick(self, now: int) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(timers)
            fn(now, *args)
        if now >= self.next_check:
            self.next_check = now + 100_000_000
            self._check(now)
        self.next_tick = min(timers[0][0] if timers else self.hard_end, self.next_check)

    def _check(self, now: int) -> None:
        """Timeouts: replies, PUB answers, SUB answers, faults."""
        limit = now - self.timeout_ns
        why = f"within {self.o.timeout:g} s"
        for pinger in self.pingers:
            if pinger.alive and pinger.expect and pinger.t < limit:
                self.drop(pinger, "timeouts", f"no +PONG {why}")
        for pub in self.pubs:
            if pub.alive and pub.acks < pub.seq and pub.stamps[pub.acks] < limit:
                self.drop(pub, "timeouts", f"no +OK to PUB {why}")
        for sub in self.subs:
            if sub.alive and not sub.subscribed and sub.connected and sub.t_open < limit:
                self.drop(sub, "timeouts", f"no +OK to SUB {why}")
        for fault in [f for f in self.faults if f.deadline < now]:
            fault.finish("failed", "timeouts", f"{fault.kind}: no outcome {why}")

    def finish(self, now: int) -> None:
        for pub in self.pubs:
            pub.end()

    def idle(self) -> bool:
        if self.faults:
            return False
        if any(p.alive and p.expect for p in self.pingers):
            return False
        if any(p.alive and p.acks < p.expect for p in self.pubs):
            return False
        return all(s.finished() for s in self.subs)

    def expire(self) -> None:
        for pinger in self.pingers:
            if pinger.alive and pinger.expect:
                self.drop(pinger, "timeouts", "no +PONG before the run ended")
        for pub in self.pubs:
            if pub.alive and pub.acks < pub.expect:
                self.drop(pub, "timeouts", f"{pub.expect - pub.acks} PUB(s) never answered")
        for fault in list(self.faults):
            fault.finish("failed", "timeouts", f"{fault.kind}: unfinished when the run ended")
        self.done = True

    def snapshot(self) -> dict[str, Any]:
        self.c["faults_run"] = sum(self.c[f"fault.{kind}.run"] for kind in FAULTS)
        snap = super().snapshot()
        extra: dict[str, Any] = {"hd": self.dhist.state()}
        if self.done:
            extra["pubs"] = {p.pub: p.record() for p in self.pubs}
            extra["subs"] = [r for s in self.subs for r in s.records()]
        snap["x"] = extra
        return snap


def soak_accounting(extras: list[dict[str, Any] | None]) -> dict[str, int]:
    """Expected, delivered and lost deliveries of a soak run, from every client process's
    final report.

    A message is expected at a subscriber when its publisher got ``+OK`` for it (the server
    accepted it) and stamped it after the subscriber's ``+OK`` to SUB arrived: the SUB was
    then done before the PUB was sent (CLOCK_MONOTONIC is one clock for every process of the
    machine). Whatever is expected and did not arrive is lost; messages published earlier
    that arrived anyway are not counted. Each publisher's end marker counts as one message.
    """
    out = {"expected": 0, "delivered": 0, "lost": 0, "incomplete": 0}
    if not extras or any(x is None or "subs" not in x for x in extras):
        out["incomplete"] = 1
        return out
    pubs: dict[int, tuple[int, array.array, bool, int]] = {}
    for x in extras:
        for pub, (accepted, raw, end_ok, end_stamp) in x["pubs"].items():
            stamps = array.array("q")
            stamps.frombytes(raw)
            pubs[pub] = (accepted, stamps, end_ok, end_stamp)
    expected = lost = 0
    for x in extras:
        for pub, t_ok, first, nxt, missing, ended in x["subs"]:
            if pub not in pubs:
                continue  # that publisher never connected: nothing of it was accepted
            accepted, stamps, end_ok, end_stamp = pubs[pub]
            s0 = bisect.bisect_right(stamps, t_ok)
            expected += accepted - s0
            if first < 0:
                lost += accepted - s0
            else:
                lost += (max(0, min(first, accepted) - s0) + max(0, accepted - max(nxt, s0))
                         + sum(1 for s in missing if s0 <= s < accepted))
            if end_ok and end_stamp > t_ok:
                expected += 1
                lost += not ended
    out.update(expected=expected, lost=lost, delivered=expected - lost)
    return out


WORKERS: dict[str, type[Worker]] = {
    "echo": EchoWorker, "hold": EchoWorker, "udp": UdpWorker,
    "connrate": ConnRateWorker, "fanout": FanoutWorker,
    "soak": SoakWorker,
}


# --------------------------------------------------------------------------- processes


def _write_frame(fd: int, kind: str, payload: Any) -> None:
    data = pickle.dumps((kind, payload))
    data = struct.pack("!I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _child(opts: Options, index: int, ids: list[int], ctl: int, rep: int) -> None:
    """A client process: setup, wait for the start time, run, report. Never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us
    status = 0
    try:
        worker = WORKERS[opts.mode](opts, index, ids)
        worker.ctl_fd = ctl
        worker.setup(now_ns() + int(opts.setup_timeout * 1e9))
        _write_frame(rep, "ready", worker.ready_info())
        ready, _, _ = select.select([ctl], [], [], opts.setup_timeout + 30)
        data = os.read(ctl, 8) if ready else b""
        if len(data) == 8:
            (t0,) = struct.unpack("!q", data)
            worker.run(t0, ctl, lambda kind, snap: _write_frame(rep, kind, snap))
            _write_frame(rep, "final", worker.snapshot())
            if not worker.ctl_closed:
                # Keep the connections open until the parent has sampled the server at the
                # end of the window (a fork server's children exit when their client leaves).
                wait = max(0.0, (worker.hard_end - now_ns()) / 1e9) + 5
                select.select([ctl], [], [], wait)
        worker.close()
    except BaseException as exc:  # report anything, then leave without running the parent's code
        status = 1
        try:
            _write_frame(rep, "fail", f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
    finally:
        os._exit(status)


class Child:
    """The parent's view of one client process."""

    def __init__(self, pid: int, rep: int, ctl: int) -> None:
        self.pid = pid
        self.rep = rep
        self.ctl: int | None = ctl
        self.buf = b""
        self.ready: dict[str, Any] | None = None
        self.snap: dict[str, Any] | None = None
        self.final = False
        self.failed: str | None = None
        self.eof = False
        self.cpu = 0.0

    def feed(self) -> list[tuple[str, Any]]:
        """Read what is there; return the complete frames."""
        try:
            data = os.read(self.rep, 1 << 20)
        except BlockingIOError:
            return []
        if not data:
            self.eof = True
            return []
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            (n,) = struct.unpack("!I", self.buf[:4])
            if len(self.buf) < 4 + n:
                break
            frames.append(pickle.loads(self.buf[4:4 + n]))
            self.buf = self.buf[4 + n:]
        for kind, payload in frames:
            if kind == "ready":
                self.ready = payload
            elif kind in ("snap", "final"):
                self.snap = payload
                self.final = self.final or kind == "final"
            elif kind == "fail":
                self.failed = payload
        return frames

    def close_ctl(self) -> None:
        """Tell the child to stop (it sees end of file)."""
        if self.ctl is not None:
            os.close(self.ctl)
            self.ctl = None


def _spawn(opts: Options) -> list[Child]:
    children = []
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(opts.procs):
        ids = list(range(index, opts.connections, opts.procs))
        ctl_r, ctl_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ctl_w)
            os.close(rep_r)
            for other in children:
                os.close(other.rep)
                other.close_ctl()
            _child(opts, index, ids, ctl_r, rep_w)
        os.close(ctl_r)
        os.close(rep_w)
        os.set_blocking(rep_r, False)
        children.append(Child(pid, rep_r, ctl_w))
    return children


def _reap(children: list[Child], deadline: float) -> None:
    """Wait for the children; kill (by pid) any still running at ``deadline``."""
    for child in children:
        child.close_ctl()
        while True:
            try:
                pid, _, usage = os.wait4(child.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                child.cpu = usage.ru_utime + usage.ru_stime
                break
            if time.monotonic() >= deadline:
                os.kill(child.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.01)
        os.close(child.rep)


# --------------------------------------------------------------------------- the run


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


# --------------------------------------------------------------------------- output


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
