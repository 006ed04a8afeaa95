"""The base class of the client workers: one client process's connections and its
selectors loop (warm-up, measured window, grace).
"""

from __future__ import annotations

import collections
import errno
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .common import ERRORS, READ, REPORT_NS, WRITE, now_ns
from .histogram import Histogram
from .options import Options

__all__ = ["Worker"]


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
