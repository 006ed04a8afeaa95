"""What every sockserv server adds to a ``socketserver`` class.

Config, stats, logging of errors, sockserv Handlers next to classic ones, a
``max_connections`` bound, and a serve loop woken by a pipe instead of polling,
so ``shutdown()`` is immediate and ``request_shutdown()`` is safe from a signal
handler.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..connection import format_address
from ..handlers import Handler
from .blocking import serve_stream

__all__ = ["ServerMixin", "Stats"]

log = logging.getLogger("sockserv")


class Stats:
    """Counters of one server process (``server.stats``); ``snapshot()`` gives a dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections_total = 0
        self.connections_active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0  # datagrams dropped: new peers over the limit, full send buffers

    def opened(self) -> None:
        with self._lock:
            self.connections_total += 1
            self.connections_active += 1

    def closed(self) -> None:
        with self._lock:
            self.connections_active -= 1

    def drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def add_traffic(self, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def is_sockserv_handler(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, Handler)


class ServerMixin:
    """Mixed in before a ``socketserver`` server class.

    A caller uses the stdlib constructor ``(server_address, RequestHandlerClass,
    bind_and_activate=True)`` plus keyword ``config``; ``serve_forever()``,
    ``shutdown()``, ``request_shutdown()`` (signal-safe), ``server_close()``
    (stops listening, then closes connections gracefully within
    ``config.shutdown_timeout``), ``config``, ``stats``, ``server_address``.

    ``RequestHandlerClass`` may be a classic ``socketserver.BaseRequestHandler``
    subclass (run exactly as the stdlib runs it) or a sockserv ``Handler``.

    An engine subclass provides: ``has_capacity()``, ``live_count()``,
    ``end_input()`` (tell every connection its input is over),
    ``abort_all()`` and ``wait_idle(deadline)``.
    """

    allow_reuse_address = True
    max_packet_size = 65535  # UDP: the largest datagram, not the stdlib's 8192

    def __init__(self, server_address: Any, RequestHandlerClass: type,
                 bind_and_activate: bool = True, *, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.stats = Stats()
        sockserv_handler = is_sockserv_handler(RequestHandlerClass)
        self.handler_class = RequestHandlerClass if sockserv_handler else None
        if isinstance(server_address, tuple) and ":" in str(server_address[0]):
            self.address_family = socket.AF_INET6
        self.request_queue_size = self.config.backlog
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stop_requested = False
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._closed = False
        try:
            super().__init__(server_address, RequestHandlerClass, bind_and_activate)
        except BaseException:
            self._close_wakeup()
            raise

    # -- the serve loop -------------------------------------------------------------

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until :meth:`shutdown`; ``poll_interval`` is accepted and ignored (no polling)."""
        self._stopped.clear()
        self._serve_thread = threading.get_ident()
        accepting = False
        try:
            self._serving.set()
            while not self._stop_requested:
                if self.has_capacity() != accepting:
                    accepting = not accepting
                    if accepting:
                        self._selector.register(self.socket, selectors.EVENT_READ)
                    else:
                        self._selector.unregister(self.socket)
                for key, _ in self._selector.select(self.next_timeout()):
                    if key.data is not None:
                        key.data()
                    elif key.fileobj is self._wake_r:
                        self._drain_wakeup()
                    elif not self._stop_requested:
                        self._handle_request_noblock()
                self.service_actions()
        finally:
            if accepting:
                self._selector.unregister(self.socket)
            self._stop_requested = False
            self._serving.clear()
            self._stopped.set()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the serve loop when ``fd`` is readable (e.g. a pidfd)."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        self._selector.unregister(fd)

    def wakeup(self) -> None:
        """Make the serve loop run one more turn (e.g. a slot freed). Safe from any thread."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # full (a wakeup is pending anyway) or closed (server closed)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def request_shutdown(self) -> None:
        """Ask ``serve_forever`` to return soon; returns at once, safe in a signal handler."""
        self._stop_requested = True
        self.wakeup()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait until it has returned (stdlib semantics).

        Called from the serving thread itself it only requests the stop."""
        self.request_shutdown()
        if getattr(self, "_serve_thread", None) != threading.get_ident():
            self._stopped.wait()

    def wait_serving(self, timeout: float | None = None) -> bool:
        """Block until ``serve_forever`` runs (for tests and embedders)."""
        return self._serving.wait(timeout)

    # -- closing ----------------------------------------------------------------------

    def server_close(self) -> None:
        """Stop listening, then close connections gracefully (see :meth:`close_connections`)."""
        if self._closed:
            return
        self._closed = True
        socketserver.TCPServer.server_close(self)  # closes the listening socket only
        self.close_connections(self.config.shutdown_timeout)
        self._close_wakeup()

    def close_connections(self, timeout: float) -> int:
        """Tell every connection its input is over, wait up to ``timeout`` seconds for
        them to finish, then abort the rest. Returns how many had to be aborted."""
        deadline = time.monotonic() + timeout
        self.end_input()
        if self.wait_idle(deadline):
            return 0
        left = self.live_count()
        log.warning("shutdown_timeout: aborting %d connection(s) still open", left)
        self.abort_all()
        self.wait_idle(time.monotonic() + 2.0)
        return left

    def _close_wakeup(self) -> None:
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __exit__(self, *args: Any) -> None:
        self.server_close()

    # -- hooks ------------------------------------------------------------------------

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the handler on one request: a classic one as the stdlib does, a sockserv
        Handler (TCP) through :func:`serve_stream`."""
        if self.handler_class is None:
            super().finish_request(request, client_address)
        else:
            serve_stream(self, request, client_address, self.handler_class, self.track)

    def track(self, sock: socket.socket, conn: Any) -> None:
        """A sockserv connection on ``sock`` started (``conn``) or ended (None)."""

    def next_timeout(self) -> float | None:
        """Seconds until the serve loop must run again by itself, None for never."""
        return None

    def has_capacity(self) -> bool:
        return True

    def live_count(self) -> int:
        return 0

    def end_input(self) -> None:
        pass

    def abort_all(self) -> None:
        pass

    def wait_idle(self, deadline: float) -> bool:
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the exception of a classic handler (instead of printing it)."""
        log.exception("error while handling %s", format_address(client_address))

    def describe(self) -> str:
        """``proto address`` for log lines, e.g. ``tcp 127.0.0.1:7007``."""
        proto = "udp" if self.socket_type == socket.SOCK_DGRAM else "tcp"
        return f"{proto} {format_address(self.server_address)}"
