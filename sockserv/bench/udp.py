"""The UDP echo workloads: udp, and pingpong or pipeline with ``--proto udp``."""

from __future__ import annotations

import socket

from .common import READ, UDP_HEADER, now_ns
from .options import Options
from .payloads import fills
from .worker import Worker

__all__ = ["UdpSock", "UdpWorker"]


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
