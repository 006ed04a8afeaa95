"""The TCP echo workloads: pingpong, pipeline and hold."""

from __future__ import annotations

import collections
import socket
from typing import Any

from .common import READ, WRITE, now_ns
from .options import Options
from .payloads import Payloads
from .worker import Worker

__all__ = ["EchoConn", "EchoWorker"]


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
