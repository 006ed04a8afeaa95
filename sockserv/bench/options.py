"""The ``bench`` command line: its arguments, and :func:`resolve`, which checks them and
fills in the per-workload defaults as an :class:`Options`.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import resource
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import _integer
from ..config import _seconds as _config_seconds
from .common import DEFAULTS, MAX_SIZE, SOAK_STAMP, STAMP, UDP_HEADER, UDP_MAX_SIZE, WORKLOADS

__all__ = ["Options", "UsageError", "add_arguments", "resolve"]


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
