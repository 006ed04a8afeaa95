"""The connrate workload: connect, one echo, close, again."""

from __future__ import annotations

import errno
import socket
from typing import Any

from .common import READ, WRITE, now_ns
from .options import Options
from .payloads import Payloads
from .worker import Worker

__all__ = ["RateSlot", "ConnRateWorker"]


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
                slot.end()
                self.retry(slot, "timeouts", f"no echo within {self.o.timeout:g} s")
        self.next_tick = now + 50_000_000
