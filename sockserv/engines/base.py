"""What every sockserv server adds to a ``socketserver`` class.

Config, stats, logging of errors, sockserv Handlers next to classic ones, a
``max_connections`` bound, and a serve loop woken by a pipe instead of polling,
so ``shutdown()`` is immediate and ``request_shutdown()`` is safe from a signal
handler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..access import AccessRules, peer_key
from ..config import Config, ConfigError
from ..connection import format_address
from ..handlers import Handler
from ..log import RateLimitedLog
from ..push import Hub, Ticker
from ..timers import Timers
from ..tls import server_context
from .blocking import serve_stream
from .listeners import UnixPath, bind_unix
from .proxied import HEADER_TIMEOUT, close_waits, expect_header, receive_header

__all__ = ["ServerMixin", "Stats"]

log = logging.getLogger("sockserv")

RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close resets


class Stats:
    """Counters of one server process (``server.stats``); ``snapshot()`` gives a dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[Any] = []  # objects whose stats() join the snapshot (the bus)
        self.connections_total = 0
        self.connections_active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0  # datagrams dropped: new peers over the limit, full send buffers
        self.delivered = 0  # push messages handed to subscribers
        self.slow_dropped = 0  # push messages dropped for slow subscribers (slow_consumer=drop)
        self.slow_disconnected = 0  # slow subscribers closed (slow_consumer=disconnect)
        self.denied = 0  # TCP connections reset and UDP datagrams dropped by allow/deny
        self.refused_per_ip = 0  # TCP connections reset over max_connections_per_ip
        self.proxy_refused = 0  # proxy_protocol: untrusted, bad or missing PROXY header

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

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (e.g. ``denied``)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

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

    def include(self, source: Any) -> None:
        """Add ``source.stats()`` (a dict, e.g. the bus's) to every :meth:`snapshot`."""
        self._sources.append(source)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            values: dict[str, Any] = {k: v for k, v in vars(self).items()
                                      if not k.startswith("_")}
        for source in self._sources:
            values.update(source.stats())
        return values


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

    With ``proxy_protocol``, accepted TCP connections wait in the serve loop for
    their PROXY header (:mod:`sockserv.engines.proxied`), then are handed to
    :meth:`serve_admitted` (which an engine with its own accept path overrides)
    as the client the header names.

    An engine subclass provides: ``has_capacity()`` (counting
    :attr:`proxy_pending` as taken slots), ``live_count()``, ``end_input()``
    (tell every connection its input is over), ``abort_all()`` and
    ``wait_idle(deadline)``. An engine with a loop of its own
    bounds each wait by ``timers.next_deadline()`` (0 while calls are queued) and
    calls :meth:`run_scheduled` each turn.
    """

    allow_reuse_address = True
    max_packet_size = 65535  # UDP: the largest datagram, not the stdlib's 8192
    #: proxy_protocol: seconds a connection has to send its whole PROXY header
    proxy_header_timeout = HEADER_TIMEOUT

    def __init__(self, server_address: Any, RequestHandlerClass: type,
                 bind_and_activate: bool = True, *, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.stats = Stats()
        self.hub = Hub(self)
        self.bus: Any = None  # the node's RedisBus (config.bus), see sockserv.bus
        sockserv_handler = is_sockserv_handler(RequestHandlerClass)
        self.handler_class = RequestHandlerClass if sockserv_handler else None
        if isinstance(server_address, tuple) and ":" in str(server_address[0]):
            self.address_family = socket.AF_INET6
        elif isinstance(server_address, str | bytes):  # a Unix socket's path
            self.address_family = socket.AF_UNIX
        self._unix_path: UnixPath | None = None  # the socket file server_bind made
        # TLS: the context is built, its files read and checked, before anything is bound.
        self.tls_context = server_context(self.config)
        if self.tls_context is not None and self.socket_type != socket.SOCK_STREAM:
            raise ConfigError("tls_cert: TLS needs a stream (TCP) server, not "
                              f"{type(self).__name__}")
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
        # Access rules, compiled once per config object (a reload brings a new one).
        self._rules_config: Config | None = None
        self._rules = AccessRules()
        self._per_ip: dict[str, int] = {}  # peer address -> live TCP connections
        self._ip_of: dict[Any, str] = {}  # request socket (fork: child pid) -> its address
        self._per_ip_lock = threading.Lock()
        self._refusal_logs = {name: RateLimitedLog(log)
                              for name in ("denied", "refused_per_ip", "proxy_refused")}
        # proxy_protocol: connections waiting for their header (fd -> HeaderWait), and
        # proxy_allow compiled per config object (see sockserv.engines.proxied)
        self._header_waits: dict[int, Any] = {}
        self._proxy_rules: tuple[Config | None, AccessRules] = (None, AccessRules())
        # Accepting pauses after EMFILE and the like: 10 ms, doubling up to 1 s.
        self._accept_resume_at = 0.0
        self._accept_backoff = 0.0
        self._accept_log = RateLimitedLog(log)
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
        if self.config.bus:
            self._start_bus(RequestHandlerClass)

    def _start_bus(self, handler: type) -> None:
        """``bus``: connect this node to the others through Redis (a push service)."""
        if not getattr(handler, "uses_hub", False):
            log.warning("bus: ignored, %s does not use the push hub", self.config.service)
            return
        from ..bus import RedisBus

        self.bus = RedisBus.from_config(self.config, self, self._bus_received)
        self.hub.bus = self.bus
        self.stats.include(self.bus)
        self.bus.start()

    def _bus_received(self, frames: bytes) -> None:
        """Messages from the other nodes, in the serve loop: to this process's
        subscribers and, through the fork engine's relay, to every child."""
        relay = getattr(self, "relay", None)
        if relay is not None:
            relay.deliver_remote(frames)
        else:
            from ..relay import deliver_frames  # (relay imports the engines)

            deliver_frames(self.hub, frames)

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
        if self.config.proxy_protocol:  # the header first; its client is then checked
            client_address = receive_header(self, request, client_address)
            if client_address is None:
                self.shutdown_request(request)
                return
        elif not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
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
        if self.socket_type == socket.SOCK_STREAM:
            # Never wait in accept: with workers, every process waits on one listener,
            # and those that lose the race for a connection would block there, deaf to
            # a stop. (Accepted sockets are blocking all the same: flags do not pass on.)
            self.socket.setblocking(False)
        try:
            self._serving.set()
            while not self._stop_requested:
                if self._accept_resume_at and time.monotonic() >= self._accept_resume_at:
                    self._accept_resume_at = 0.0  # the accept back-off is over
                if (self.has_capacity() and not self._accept_resume_at) != accepting:
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
        if self._accept_resume_at and (deadline is None or self._accept_resume_at < deadline):
            deadline = self._accept_resume_at
        if deadline is not None:
            wait = max(0.0, deadline - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def run_scheduled(self) -> None:
        """Run the timers that are due and the calls queued by :meth:`call_soon_threadsafe`
        (the serve loop does, each turn)."""
        self.timers.run_due(time.monotonic())
        self.run_calls()

    def run_calls(self) -> None:
        """Run the calls queued by :meth:`call_soon_threadsafe` (serve loop thread only)."""
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

    @contextlib.contextmanager
    def signals_wake_loop(self) -> Iterator[None]:
        """While it lasts, every signal also writes to the serve loop's wakeup pipe
        (``signal.set_wakeup_fd``; main thread only), so a signal the kernel hands to
        another thread still wakes a loop asleep in ``poll`` to run its handler."""
        previous = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)

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
        close_waits(self)  # connections still waiting for a PROXY header
        if self._unix_path is not None:  # a socket file this server made (not systemd's)
            self._unix_path.remove()
        self.close_connections(self.config.shutdown_timeout)
        if self.bus is not None:
            self.bus.close()
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

    def server_bind(self) -> None:
        """Bind, as ``socketserver`` does; at a Unix socket path, replace a stale socket
        file but never a live one (``OSError`` EADDRINUSE), apply ``unix_mode``, and
        remember the file so that :meth:`server_close` removes it."""
        if self.address_family != socket.AF_UNIX:
            super().server_bind()  # type: ignore[misc]
            return
        self._unix_path = bind_unix(self.socket, self.server_address, self.config.unix_mode)
        self.server_address = self.socket.getsockname()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the handler on one request: a classic one as the stdlib does, a sockserv
        Handler (TCP) through :func:`serve_stream`; over TLS through
        :func:`sockserv.engines.tls.serve_tls` (the handshake first, in this thread)."""
        if self.tls_context is not None:
            from .tls import serve_tls  # imports the select engine, which imports this

            serve_tls(self, request, client_address, self.handler_class, self.track)
        elif self.handler_class is None:
            super().finish_request(request, client_address)
        else:
            serve_stream(self, request, client_address, self.handler_class, self.track)

    def _handle_request_noblock(self) -> None:
        """As ``socketserver``'s; with ``proxy_protocol`` a TCP connection first waits
        in the serve loop for its PROXY header (see :mod:`sockserv.engines.proxied`),
        then goes through ``verify_request`` and :meth:`serve_admitted`."""
        if not self.config.proxy_protocol or self.socket_type != socket.SOCK_STREAM:
            super()._handle_request_noblock()  # type: ignore[misc]
            return
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        expect_header(self, request, client_address)

    def serve_admitted(self, request: Any, client_address: Any, proxied: bool = False) -> None:
        """Serve a connection that ``verify_request`` admitted, as ``client_address``
        (with ``proxied``, the address its PROXY header carried): here, as
        ``socketserver`` does, ``process_request``, its errors logged."""
        try:
            self.process_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)  # type: ignore[attr-defined]
        except BaseException:
            self.shutdown_request(request)  # type: ignore[attr-defined]
            raise

    @property
    def proxy_pending(self) -> int:
        """Connections waiting for their PROXY header; each holds one of
        ``max_connections``."""
        return len(self._header_waits)

    def slot_freed(self) -> None:
        """A slot of ``max_connections`` was freed outside the engine's own counts (a
        connection refused after waiting for its PROXY header). The serve loop checks
        :meth:`has_capacity` each turn; an engine that does otherwise overrides this."""

    def get_request(self) -> Any:
        """As ``socketserver``'s; when ``accept`` fails for lack of descriptors or memory
        (EMFILE, ENFILE, ENOBUFS, ENOMEM) the serve loop stops accepting for 10 ms,
        doubling up to 1 s while it keeps failing, instead of spinning on a listener
        that stays readable; logged at most once a second."""
        try:
            if self.socket_type == socket.SOCK_DGRAM:  # never wait either (see serve_forever)
                data, address = self.socket.recvfrom(self.max_packet_size, socket.MSG_DONTWAIT)
                request = (data, self.socket), address
            else:
                request = super().get_request()  # type: ignore[misc]
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self.accept_failed(exc)
            raise
        self._accept_backoff = 0.0
        return request

    def accept_failed(self, exc: OSError) -> None:
        """Pause accepting after a resource error (see :meth:`get_request`)."""
        step = self._accept_backoff = min(1.0, max(0.01, self._accept_backoff * 2))
        self._accept_resume_at = time.monotonic() + step
        self._accept_log.log(logging.WARNING, "accept failed (%s): pausing accepting for %.2fs, "
                             "%d connections open", exc.strerror or exc, step, self.live_count())

    # -- access rules and per-address limits ------------------------------------------

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a peer before any handler runs (the ``socketserver`` hook, called for
        every TCP connection and every UDP datagram): the ``allow`` and ``deny`` rules,
        then, for TCP, ``max_connections_per_ip``. False refuses it: the caller closes
        the connection (reset) or drops the datagram. Refusals are counted
        (``stats.denied``, ``stats.refused_per_ip``) and logged at most once a second
        each. The settings are read from ``self.config`` each time, so a reload
        applies to the next peer. With ``proxy_protocol`` it is called once the
        PROXY header is in, with the client address the header carries. A subclass
        adding checks of its own calls this one last (``return mine(...) and
        super().verify_request(...)``): a connection it counts is one that is
        admitted."""
        config = self.config
        if config is not self._rules_config:
            self._rules = AccessRules(config.allow, config.deny)
            self._rules_config = config
        if not isinstance(client_address, tuple):
            return True  # a Unix socket peer: no address to check
        stream = isinstance(request, socket.socket)
        rules = self._rules
        if not rules and not stream:
            return True  # the common UDP case: nothing to check
        host = client_address[0]
        why = rules.check(host) if rules else None
        if why is None:
            # Every TCP connection is counted (with the limit 0 too), so a reload that
            # sets max_connections_per_ip counts the connections already open.
            limit = config.max_connections_per_ip
            if not stream or self._hold(request, host, limit):
                return True
            counter, why = "refused_per_ip", f"over max_connections_per_ip ({limit})"
        else:
            counter = "denied"
        self.refuse(request, client_address, counter, why)
        return False

    def refuse(self, request: Any, client_address: Any, counter: str, why: str,
               level: int = logging.INFO) -> None:
        """Refuse a peer: count it in ``stats.<counter>``, log why (at most once a
        second per counter), and make closing a TCP connection reset it. The caller
        closes the connection (or drops the datagram)."""
        stream = isinstance(request, socket.socket)
        self.stats.count(counter)
        self._refusal_logs[counter].log(
            level, "refused %s %s: %s", "connection from" if stream else "datagram from",
            format_address(client_address), why)
        if stream:
            try:
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass

    def _hold(self, request: socket.socket, host: str, limit: int) -> bool:
        """Count one more connection of ``host`` unless it has ``limit`` (0: no limit)."""
        key = peer_key(host)
        with self._per_ip_lock:
            held = self._per_ip.get(key, 0)
            if limit and held >= limit:
                return False
            self._per_ip[key] = held + 1
            self._ip_of[request] = key
        return True

    def release_peer(self, token: Any) -> None:
        """A connection admitted by :meth:`verify_request` ended (``token``: its request
        socket, or what :meth:`transfer_peer` moved it to): uncount it."""
        with self._per_ip_lock:
            key = self._ip_of.pop(token, None)
            if key is not None:
                held = self._per_ip[key] - 1
                if held:
                    self._per_ip[key] = held
                else:
                    del self._per_ip[key]

    def transfer_peer(self, request: Any, token: Any) -> None:
        """Count the connection of ``request`` under ``token`` from now on (the fork
        engine: the child's pid, since the parent closes its copy of the socket)."""
        with self._per_ip_lock:
            key = self._ip_of.pop(request, None)
            if key is not None:
                self._ip_of[token] = key

    def connections_per_ip(self) -> dict[str, int]:
        """Live TCP connections by peer address (what ``max_connections_per_ip`` bounds)."""
        with self._per_ip_lock:
            return dict(self._per_ip)

    def close_request(self, request: Any) -> None:
        """Close a request (as ``socketserver`` does), uncounting its connection."""
        if isinstance(request, socket.socket):
            self.release_peer(request)
        super().close_request(request)  # type: ignore[misc]

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
