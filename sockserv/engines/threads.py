"""The ``thread`` engine: a thread per TCP connection, per UDP peer (sockserv Handlers)
or per datagram (classic handlers), at most ``max_connections`` at once.

At the limit the server stops accepting: new TCP connections wait in the kernel's
backlog until a thread finishes, classic UDP datagrams wait in the socket buffer;
datagrams from new peers of a sockserv Handler are dropped (and counted).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import socketserver
import threading
import time
from typing import Any

from .base import ServerMixin
from .peers import DatagramPeer

__all__ = ["ThreadingTCPServer", "ThreadingUDPServer"]

log = logging.getLogger("sockserv")


class ThreadEngine(ServerMixin):
    """Bookkeeping shared by the threading servers: count, track and stop worker threads.

    On Linux each worker thread runs under ``SCHED_BATCH`` (see :func:`_schedule_as_batch`)
    unless its policy was chosen for it; a subclass may set ``batch_scheduling = False``.
    """

    daemon_threads = True
    batch_scheduling = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._workers = 0
        self._live: dict[socket.socket, Any] = {}  # TCP: request socket -> sockserv conn or None
        super().__init__(*args, **kwargs)

    def has_capacity(self) -> bool:
        return self._workers + len(self._header_waits) < self.config.max_connections

    def live_count(self) -> int:
        return self._workers

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the request in a new thread."""
        self._start(self.process_request_thread, request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        stream = isinstance(request, socket.socket)
        if stream:
            with self._lock:
                self._live[request] = None
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if stream:
                with self._lock:
                    self._live.pop(request, None)
            self.shutdown_request(request)

    def track(self, sock: socket.socket, conn: Any) -> None:
        with self._lock:
            if sock in self._live:
                self._live[sock] = conn

    def _start(self, target: Any, *args: Any) -> None:
        with self._lock:
            self._workers += 1
        self.stats.opened()
        try:
            threading.Thread(target=self._run, args=(target, *args), daemon=True).start()
        except BaseException:
            self._release()
            raise

    def _run(self, target: Any, *args: Any) -> None:
        if self.batch_scheduling:
            _schedule_as_batch()
        try:
            target(*args)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._workers -= 1
            was_full = self._workers + 1 + len(self._header_waits) >= self.config.max_connections
            if not self._workers:
                self._idle.notify_all()
        self.stats.closed()
        if was_full:
            self.wakeup()  # the serve loop may have stopped accepting

    def end_input(self) -> None:
        with self._lock:
            socks = list(self._live)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def abort_all(self) -> None:
        with self._lock:
            live = list(self._live.items())
        for sock, conn in live:
            if conn is not None:
                conn.abort()
            else:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait_idle(self, deadline: float) -> bool:
        with self._lock:
            while self._workers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True


def _schedule_as_batch() -> None:
    """Move the calling thread from the default policy to ``SCHED_BATCH`` (Linux only).

    A worker thread spends its turn holding the GIL or waiting for it. When data wakes a
    thread, the default policy lets it preempt the thread that holds the GIL, only to block
    on the GIL at once: a context switch for nothing, and with many connections some
    threads starve while the woken ones churn (p99 latency). Under ``SCHED_BATCH`` a
    woken thread waits until the running one blocks, which in a server is usually in I/O,
    with the GIL released. A policy set by the operator (e.g. systemd's
    ``CPUSchedulingPolicy=``) is left alone, and so is the nice value.
    """
    try:
        if os.sched_getscheduler(0) == os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not permitted: the default policy
        pass


class ThreadingTCPServer(ThreadEngine, socketserver.TCPServer):
    """Drop-in for ``socketserver.ThreadingTCPServer``; runs classic and sockserv handlers."""


class ThreadingUDPServer(ThreadEngine, socketserver.UDPServer):
    """Drop-in for ``socketserver.ThreadingUDPServer``. A classic handler gets a thread
    per datagram (as in the stdlib); a sockserv Handler gets one thread per peer."""

    allow_reuse_address = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._peers: dict[Any, queue.SimpleQueue] = {}
        super().__init__(*args, **kwargs)

    def has_capacity(self) -> bool:
        # Per-peer mode must keep reading: known peers' datagrams still flow at the limit.
        return self.handler_class is not None or super().has_capacity()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.handler_class is None:
            return super().process_request(request, client_address)
        data = request[0]
        with self._lock:
            inbox = self._peers.get(client_address)
            if inbox is None:
                if self._workers >= self.config.max_connections:
                    self.stats.drop()
                    return
                inbox = self._peers[client_address] = queue.SimpleQueue()
                start = True
            else:
                start = False
            inbox.put(data)
        if start:
            self._start(self._serve_peer, client_address, inbox)

    def _serve_peer(self, peer: Any, inbox: queue.SimpleQueue) -> None:
        conn = DatagramPeer(self, self.handler_class, peer)
        idle = self.config.udp_idle or None
        try:
            if not conn.dispatch("connection_made"):
                return
            while not conn.closing:
                try:
                    data = inbox.get(timeout=idle)
                except queue.Empty:
                    with self._lock:
                        if not inbox.empty():
                            continue
                        del self._peers[peer]  # expired: the next datagram makes a new peer
                    return
                if data is None:  # the server is stopping
                    return
                conn.received(data)
        finally:
            with self._lock:
                if self._peers.get(peer) is inbox:
                    del self._peers[peer]
            conn.finished(None)

    def end_input(self) -> None:
        with self._lock:
            for inbox in self._peers.values():
                inbox.put(None)
        super().end_input()

    abort_all = end_input  # a peer thread cannot be interrupted inside its handler
