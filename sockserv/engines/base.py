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
from collections import deque
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..connection import format_address
from ..handlers import Handler
from ..push import Hub, Ticker
from ..timers import Timers
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
        self.delivered = 0  # push messages handed to subscribers
        self.slow_dropped = 0  # push messages dropped for slow subscribers (slow_consumer=drop)
        self.slow_disconnected = 0  # slow subscribers closed (slow_consumer=disconnect)

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

    def pushed(self, delivered: int, dropped: int, disconnected: int) -> None:
        """Count one fan-out of the push hub."""
        with self._lock:
            self.delivered += delivered
            self.slow_dropped += dropped
            self.slow_disconnected += disconnected

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

    :meth:`from_socket` builds a server around a socket bound elsewhere (systemd
    socket activation, a supervisor's listener) instead of binding.
    ``timers.call_at(when, fn)`` (``time.monotonic()`` clock) and
    ``call_soon_threadsafe(fn, *args)`` run callbacks in the serve loop; the
    systemd integration (``sockserv.systemd``) uses them for READY, STATUS and
    the watchdog, so that a hung loop stops the watchdog pings.

    An engine subclass provides: ``has_capacity()``, ``live_count()``,
    ``end_input()`` (tell every connection its input is over),
    ``abort_all()`` and ``wait_idle(deadline)``. An engine with a loop of its own
    bounds each wait by ``timers.next_deadline()`` (0 while calls are queued) and
    calls :meth:`run_scheduled` each turn.
    """

    allow_reuse_address = True
    max_packet_size = 65535  # UDP: the largest datagram, not the stdlib's 8192

    def __init__(self, server_address: Any, RequestHandlerClass: type,
                 bind_and_activate: bool = True, *, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.stats = Stats()
        self.hub = Hub(self)
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
        # Run by the serve loop (every engine's): timers.call_at(when, fn) on the
        # time.monotonic() clock, and call_soon_threadsafe(fn, *args) from anywhere.
        self.timers = Timers()
        self._calls: deque[tuple[Callable[..., Any], tuple]] = deque()
        if self.config.tick:
            Ticker(self, self.config.tick).start()  # publishes from the serve loop
        try:
            super().__init__(server_address, RequestHandlerClass, bind_and_activate)
        except BaseException:
            self._close_wakeup()
            raise

    @classmethod
    def from_socket(cls, sock: socket.socket, RequestHandlerClass: type, *,
                    config: Config | None = None) -> Any:
        """A server around ``sock``, a socket bound elsewhere (passed by systemd,
        inherited from a supervisor, or made by the caller), instead of binding one.

        ``sock`` must be of the class's type (``SOCK_STREAM`` for the TCP servers,
        ``SOCK_DGRAM`` for the UDP ones), of any family (IPv4, IPv6, Unix). A stream
        socket already listening (``SO_ACCEPTCONN``) is used as it is, keeping its
        backlog; one that is not gets ``listen(backlog)``. The server owns this
        process's copy of the descriptor: ``server_close()`` closes it, and never
        shuts the socket down or unlinks its path, so a copy held by systemd (or a
        parent) keeps working.
        """
        if sock.type != cls.socket_type:
            kind = "stream" if cls.socket_type == socket.SOCK_STREAM else "datagram"
            raise ValueError(f"{cls.__name__} needs a {kind} socket, got {sock.type!r}")
        address = sock.getsockname()
        server = cls(address, RequestHandlerClass, False, config=config)
        server.socket.close()  # the unbound one the constructor made
        server.socket = sock
        server.address_family = sock.family
        server.server_address = address
        if sock.type == socket.SOCK_STREAM and \
                not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            server.server_activate()
        return server

    def serve_connection(self, request: socket.socket, client_address: Any = None) -> None:
        """Serve one stream connection accepted elsewhere (inetd style: systemd
        ``Accept=yes``) in the calling thread, until it ends; then shut it down."""
        if client_address is None:
            try:
                client_address = request.getpeername()
            except OSError:
                client_address = ""
        self.stats.opened()
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.stats.closed()
            self.shutdown_request(request)

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
                for key, _ in self._selector.select(self._loop_timeout()):
                    if key.data is not None:
                        key.data()
                    elif key.fileobj is self._wake_r:
                        self._drain_wakeup()
                    elif not self._stop_requested:
                        self._handle_request_noblock()
                self.service_actions()
                self.run_scheduled()
        finally:
            if accepting:
                self._selector.unregister(self.socket)
            self._stop_requested = False
            self._serving.clear()
            self._stopped.set()

    def _loop_timeout(self) -> float | None:
        if self._calls:
            return 0.0
        timeout = self.next_timeout()
        deadline = self.timers.next_deadline()
        if deadline is not None:
            wait = max(0.0, deadline - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def run_scheduled(self) -> None:
        """Run the timers that are due and the calls queued by :meth:`call_soon_threadsafe`
        (the serve loop does, each turn)."""
        self.timers.run_due(time.monotonic())
        while self._calls:
            fn, args = self._calls.popleft()
            fn(*args)

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the serve loop, soon. Safe from any thread and from a
        signal handler (a deque append and a write to the wakeup pipe)."""
        self._calls.append((fn, args))
        self.wakeup()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the serve loop when ``fd`` is readable (e.g. a pidfd)."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        self._selector.unregister(fd)

    def publish(self, channel: str | bytes, payload: str | bytes) -> int:
        """Publish ``MSG <channel> <payload>`` to every subscriber of the server (every
        process of it); safe from any thread. See :meth:`sockserv.Hub.publish`."""
        return self.hub.publish(channel, payload)

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

    def healthy(self) -> bool:
        """The liveness check before each systemd watchdog ping. The ping is sent by
        the serve loop itself, so a running loop is the check; a supervisor (or an
        engine with helpers that can get stuck) overrides this to check them too."""
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
        if self.address_family == socket.AF_UNIX:
            proto = "unix" if proto == "tcp" else "unixgram"
        return f"{proto} {format_address(self.server_address)}"
