"""Two servers on one core at the same time: whose CPU per message is lower.

    python examples/benchmarks/shared_core.py                      # select vs asyncio, pingpong-50
    python examples/benchmarks/shared_core.py --workload pipeline --rounds 8
    python examples/benchmarks/shared_core.py --servers "sockserv thread,socketserver threading"
    python examples/benchmarks/shared_core.py --workload pipeline \
        --client "~/loadgen --port {port} --pid {pid} -m stream -k 16 -c 50 -d 3 -w 0.5"

compare.py runs one server at a time, so the machine's speed may change between
two servers' runs; on a shared virtual machine that drift (up to 2x here) hides
differences of a few percent. This script instead starts both servers pinned to
core 0, and a client for each pinned to core 1, all at once (the clients start
a few milliseconds apart, so their windows overlap all but that): the scheduler
shares core 0 between the two servers, and whatever the machine does meanwhile
touches both alike. Each round reports each server's CPU time per message over
the client's measured window (``--server-pid``) and the ratio of the two; the
summary is the median ratio over the rounds, with its range. With the servers
CPU-bound, the ratio of their rates is the inverse of that ratio.

The client is ``python -m sockserv bench`` with the workload's arguments, or any
command given with ``--client`` that prints a JSON line at the end with either
``server.cpu_per_message_us`` (sockserv bench) or ``server_cpu`` (CPU share)
beside a ``*_per_s`` rate; ``{port}`` and ``{pid}`` are filled in. Both servers
need a client that keeps them busy, or the figure is CPU per message at the rate
the client managed. Linux only (taskset, /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from compare import (
    Server,
    Workload,
    baseline_servers,
    free_port,
    server_env,
    sockserv_servers,
    stop_server,
    wait_ready,
    workloads,
)

RATE_KEYS = ("per_second", "msgs_per_s", "conns_per_s", "dgrams_per_s", "delivered_per_s")


def cpu_per_message(result: dict[str, Any]) -> tuple[float, float]:
    """(server CPU µs per message, messages per second) from a client's JSON result."""
    rate = next((result[k] for k in RATE_KEYS if result.get(k)), 0.0)
    server = result.get("server")
    if isinstance(server, dict) and server.get("cpu_per_message_us"):
        return server["cpu_per_message_us"], rate
    if result.get("server_cpu") and rate:
        return result["server_cpu"] / rate * 1e6, rate
    raise ValueError("the client's JSON has no server CPU figure (was it given the pid?)")


def can_pin() -> bool:
    """Whether this process may run on cores 0 and 1, with taskset and /proc."""
    return (hasattr(os, "sched_getaffinity") and {0, 1} <= os.sched_getaffinity(0)
            and shutil.which("taskset") is not None and os.path.exists("/proc/self/stat"))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def client_argv(opts: argparse.Namespace, bench_args: tuple[str, ...], port: int,
                pid: int) -> list[str]:
    if opts.client:
        return shlex.split(os.path.expanduser(opts.client.format(port=port, pid=pid)))
    return [sys.executable, "-m", "sockserv", "bench", *bench_args, "--port", str(port),
            "--duration", str(opts.duration), "--warmup", str(opts.warmup),
            "--server-pid", str(pid), "--json", "--no-progress"]


def one_round(pair: list[Server], workload: Workload,
              opts: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Both servers and both clients at once; {server name: (µs per message, rate)}."""
    env = server_env()
    kind, bench_args, connections = workload.kind, workload.args, workload.connections
    procs, clients = {}, {}
    try:
        for server in pair:
            port = free_port()
            procs[server.name] = (port, subprocess.Popen(
                ["taskset", "-c", "0", *server.command(kind, port, connections)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=env))
            try:
                wait_ready(port, kind, procs[server.name][1])
            except RuntimeError as exc:
                raise RuntimeError(f"{server.name}: {exc}") from None
        for name, (port, proc) in procs.items():
            clients[name] = subprocess.Popen(
                ["taskset", "-c", "1", *client_argv(opts, bench_args, port, proc.pid)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=env)
        deadline = time.monotonic() + 3 * (opts.duration + opts.warmup) + 30  # both clients
        outputs = {name: client.communicate(timeout=max(0.1, deadline - time.monotonic()))
                   for name, client in clients.items()}
    finally:
        for client in clients.values():
            if client.poll() is None:
                client.kill()
                client.wait()
        for _, proc in procs.values():
            stop_server(proc)
    results = {}
    for name, (out, err) in outputs.items():
        lines = [line for line in out.splitlines() if line.startswith("{")]
        said = (err.strip().splitlines() or [""])[-1]
        status = clients[name].returncode
        if not lines:
            raise RuntimeError(f"the client of {name} printed no JSON (exit {status})"
                               + (f": {said}" if said else ""))
        result = json.loads(lines[-1])
        if status != 0 or not result.get("ok", True):
            raise RuntimeError(f"the client of {name} reported errors (exit {status}): "
                               f"{result.get('first_error') or said}")
        results[name] = cpu_per_message(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="sockserv select,asyncio Protocol",
                        help="two server names of compare.py --list, comma-separated "
                             "(default: %(default)s)")
    parser.add_argument("--workload", default="pingpong-50",
                        help="a workload of compare.py --list (default: %(default)s)")
    parser.add_argument("--rounds", type=positive, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--client", help="client command instead of sockserv bench, with "
                                         "{port} and {pid}")
    opts = parser.parse_args(argv)
    known = {s.name: s for s in sockserv_servers(sys.executable) + baseline_servers(sys.executable)}
    names = [n.strip() for n in opts.servers.split(",")]
    if len(names) != 2 or any(n not in known for n in names):
        parser.error(f"--servers: two of {', '.join(sorted(known))}")
    work = {w.key: w for w in workloads()}
    if opts.workload not in work:
        parser.error(f"--workload: one of {', '.join(work)}")
    workload = work[opts.workload]
    if workload.metric != "per_second":
        parser.error(f"--workload {workload.key} has no CPU per message to compare")
    for name in names:
        if not known[name].runs(workload):
            parser.error(f"{name} does not serve {workload.key}")
    if not can_pin():
        parser.error("needs Linux, taskset and cores 0 and 1")
    a, b = names
    ratios, rate_ratios = [], []
    for n in range(opts.rounds):
        pair = [known[a], known[b]] if n % 2 == 0 else [known[b], known[a]]
        try:
            res = one_round(pair, workload, opts)
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            print(f"shared_core: round {n + 1}: {exc}", file=sys.stderr)
            return 1
        ratios.append(res[a][0] / res[b][0])
        rate_ratios.append(res[a][1] / res[b][1])
        print(f"round {n + 1}: {a} {res[a][0]:.3f} µs ({res[a][1]:,.0f}/s), "
              f"{b} {res[b][0]:.3f} µs ({res[b][1]:,.0f}/s): CPU per message "
              f"{ratios[-1]:.3f}x", flush=True)
    print(f"{a} / {b}, median of {opts.rounds} rounds: CPU per message "
          f"{statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f}), "
          f"rate {statistics.median(rate_ratios):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
