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

Where things are:

- ``common``: the workloads, their defaults and the constants every module shares
- ``options``: the command's arguments, checked into an ``Options``
- ``histogram``, ``payloads``: latency buckets; the bytes sent and checked
- ``worker``: the client processes' base class (setup, then one selectors loop)
- ``echo``, ``connrate``, ``udp``, ``fanout``, ``soak``: one workload each
- ``processes``: forking the clients, their reports over pipes, reaping
- ``procstat``: sampling the server from /proc
- ``run``: the parent (start, sample, progress, merge) and ``main``
- ``report``: the human summary
"""

from __future__ import annotations

from .histogram import Histogram
from .options import Options, add_arguments
from .procstat import process_tree, server_sample
from .run import main

__all__ = ["Histogram", "Options", "add_arguments", "main", "process_tree", "server_sample"]
