"""A UDP telemetry receiver: datagrams of ``name value`` lines, statistics per name.

    sockserv serve telemetry:Telemetry --proto udp --port 8125    # from this directory
    echo "cpu.load 0.73" | nc -u -q0 127.0.0.1 8125                # report (no answer)
    printf 'disk.free 120\\nrequests 3\\n' | nc -u -q0 127.0.0.1 8125
    echo "STATS" | nc -u -w1 127.0.0.1 8125                        # ask: one line per name
    cpu.load count=1 min=0.73 max=0.73 mean=0.73 last=0.73
    ...

A name is 1-128 bytes of ``A-Z a-z 0-9 . _ : -``; a value is a number. Malformed
lines are counted (``STATS`` ends with ``errors=N``) and otherwise ignored: a
telemetry sender never waits for an answer. ``STATS name`` asks for one name.
A line longer than ``max_line`` gets LineHandler's ``-ERR line too long``.

The statistics belong to the server object, shared by its peers: run it on the
``select`` (default) or ``thread`` engine. (With ``--engine fork`` each peer is
a process of its own, with statistics of its own.)
"""

import math
import threading

import sockserv
from sockserv.push import valid_channel


class Stat:
    """Running statistics of one metric."""

    __slots__ = ("count", "total", "low", "high", "last")

    def __init__(self) -> None:
        self.count, self.total = 0, 0.0
        self.low, self.high, self.last = math.inf, -math.inf, 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low, self.high, self.last = min(self.low, value), max(self.high, value), value

    def line(self, name: bytes) -> bytes:
        return b"%s count=%d min=%g max=%g mean=%g last=%g\n" % (
            name, self.count, self.low, self.high, self.total / self.count, self.last)


class Metrics:
    """Every metric of one server, and the count of malformed lines. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stats: dict[bytes, Stat] = {}
        self.errors = 0

    def record(self, line: bytes) -> bool:
        """Take one ``name value`` line; False (and counted) if it is malformed."""
        name, _, value = line.strip().partition(b" ")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        with self.lock:
            if not valid_channel(name) or not math.isfinite(number):
                self.errors += 1
                return False
            stat = self.stats.get(name)
            if stat is None:
                stat = self.stats[name] = Stat()
            stat.add(number)
            return True

    def report(self, name: bytes = b"") -> bytes:
        """``STATS [name]``: one line per metric (sorted), then ``errors=N``."""
        with self.lock:
            names = [name] if name else sorted(self.stats)
            lines = [self.stats[n].line(n) for n in names if n in self.stats]
            return b"".join(lines) + b"errors=%d\n" % self.errors


_create = threading.Lock()


def metrics_of(server) -> Metrics:
    """The Metrics of ``server`` (made on first use)."""
    with _create:
        if not hasattr(server, "telemetry"):
            server.telemetry = Metrics()
        return server.telemetry


class Telemetry(sockserv.LineHandler):
    """One sender (a UDP peer): each line of its datagrams is a measurement or ``STATS``."""

    def line_received(self, line: bytes) -> None:
        metrics = metrics_of(self.conn.server)
        if line == b"STATS" or line.startswith(b"STATS "):
            self.conn.write(metrics.report(line[6:].strip()))  # one datagram back
        else:
            metrics.record(line)
