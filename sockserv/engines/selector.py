"""The ``select`` engine: every connection of the process on one non-blocking event
loop over ``selectors.DefaultSelector`` (epoll on Linux).

The loop only moves bytes: readable -> a read of the descriptor ->
``handler.data_received``; ``conn.write`` sends at once what the kernel takes
and queues the rest until the socket is writable. Flow control: above
``max_buffer`` unsent bytes a connection is no longer read until its output
drains below half of that.
Timers (idle timeouts, accept back-off, close deadlines) and a wakeup pipe
drive the loop; nothing polls.

At ``max_connections`` the listener is taken out of the loop, so new
connections wait in the kernel backlog. When ``accept`` fails for lack of
descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) accepting pauses
with a back-off from 10 ms doubling to 1 s, logged at most once a second.

A classic ``socketserver`` handler is blocking code: on this engine each such
TCP connection runs in a thread of its own, and each UDP datagram is handled
inline, as ``socketserver.UDPServer`` does.
"""

from __future__ import annotations

import errno
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

from ..connection import Connection, format_address
from ..handlers import EchoHandler
from ..push import encode_message, write_each
from ..timers import IdleWheel
from .base import ServerMixin
from .blocking import RECV_SIZE, SMALL_RECV, read_rest
from .peers import DatagramPeer
from .poller import Poller
from .proxied import expect_header

__all__ = ["SelectorTCPServer", "SelectorUDPServer"]

log = logging.getLogger("sockserv")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
ACCEPT_BATCH = 128  # connections accepted per wakeup of the listener
DATAGRAM_BATCH = 64  # datagrams read per wakeup of a UDP socket
LINGER = 2.0  # seconds a closed connection keeps draining input, so the peer sees no reset
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_thread_id = threading.get_ident  # on the write path: one lookup less per message
# Connections read and write their descriptor with os.read and os.write: the same
# syscalls' work as socket.recv and send (on a non-blocking socket, whose errors map
# to the same exceptions), but with less argument parsing per call: 2 % of the CPU
# per message of a pipelined echo. The socket object still owns the descriptor.
_read, _write = os.read, os.write


class _Callback:
    """Adapts a plain callback (``watch(fd, fn)``, the wakeup pipe) to the loop's protocol."""

    __slots__ = ("on_readable",)
    closed = False

    def __init__(self, callback: Callable[[], Any]) -> None:
        self.on_readable = callback

    def on_writable(self) -> None:
        """Nothing: an error or hang-up reported as writable too is read by on_readable."""


class SelectorConnection(Connection):
    """A TCP connection on the event loop (see the module doc)."""

    __slots__ = ("sock", "fd", "loop", "handler", "closing", "closed", "bytes_in", "bytes_out",
                 "started", "last", "_peer", "_out", "_pending", "_events", "_eof", "_close_timer",
                 "_turn", "_recv_size")

    def __init__(self, loop: SelectorEngine, sock: socket.socket, handler_class: type,
                 peer: Any = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.closing = False
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = self.last = loop.now
        self._out: deque[bytes | memoryview] | None = None
        self._pending = 0
        self._events = READ
        self._eof = False
        self._close_timer: Any = None
        # None: asked of the kernel when needed, so idle connections stay small (given
        # with proxy_protocol: the client its PROXY header named)
        self._peer = peer
        self._turn = -1  # the loop turn of the last direct send
        self._recv_size = SMALL_RECV  # (see blocking.SMALL_RECV)
        self.handler = handler_class(self)

    # -- what the handler uses ----------------------------------------------------------

    @property
    def server(self) -> Any:
        return self.loop

    @property
    def peer(self) -> Any:
        if self._peer is None and not self.closed:
            try:
                self._peer = self.sock.getpeername()
            except OSError:
                pass
        return self._peer

    @property
    def local(self) -> Any:
        return self.loop.server_address

    @property
    def buffered(self) -> int:
        return self._pending

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        loop = self.loop
        if _thread_id() != loop.loop_thread:
            loop.call_soon_threadsafe(self.write, bytes(data))
            return
        if self._out:
            self._queue(data)
            return
        if not data:
            return
        if self._turn == loop.turn:
            # A second write in one turn of the loop (many lines at once): gather it
            # and send everything in one call when the turn ends.
            self._defer(data)
            return
        self._send_now(data, loop.turn)

    def _send_now(self, data: bytes, turn: int) -> None:
        """The first write of a turn with nothing queued: send at once what the kernel
        takes, queue the rest."""
        self._turn = turn
        try:
            sent = _write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        self.bytes_out += sent
        if sent < len(data):
            self._hold_rest(data, sent)

    def gather(self, data: bytes) -> None:
        """Like :meth:`write`, but sent at the end of this turn of the loop together with
        whatever else the connection is sent meanwhile: a push subscriber gets the
        messages of one turn in one ``send``."""
        if self.closing:
            return
        if _thread_id() != self.loop.loop_thread:
            self.loop.call_soon_threadsafe(self.gather, bytes(data))
        elif self._out:
            self._queue(data)
        elif data:
            self._defer(data)

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._pending += len(data)
        if self._pending > self.loop.config.max_buffer and self._events & READ:
            self._set_events(WRITE)  # stop reading until the output drains

    def _hold_rest(self, data: bytes, sent: int) -> None:
        """A direct send took only ``sent`` bytes of ``data``: queue the rest until the
        socket is writable (and stop reading if that is over ``max_buffer``)."""
        self._out = deque((memoryview(data)[sent:],))
        self._pending = len(data) - sent
        self._set_events(WRITE if self._pending > self.loop.config.max_buffer
                         else self._events | WRITE)

    def _defer(self, data: bytes) -> None:
        self._out = deque((data,))
        self._pending = len(data)
        self.loop.deferred.append(self)

    def close(self) -> None:
        """Stop reading, flush what was written, then close (bounded by shutdown_timeout)."""
        if self.closing:
            return
        loop = self.loop
        if _thread_id() != loop.loop_thread:
            loop.call_soon_threadsafe(self.close)
            return
        # Writes other threads made before this close are still queued for the loop:
        # they come first, so close() flushes everything written before it.
        loop.run_calls()
        if self.closing:
            return
        self.closing = True
        if self._pending:
            self._set_events(WRITE)
            self._close_timer = loop.timers.call_at(loop.now + loop.config.shutdown_timeout,
                                                    self.abort)
        else:
            self._linger()

    def abort(self) -> None:
        if _thread_id() != self.loop.loop_thread:
            self.loop.call_soon_threadsafe(self.abort)
            return
        self.closing = True
        self._finish(None)

    # -- what the loop calls ------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = _read(self.fd, self._recv_size)
            n = len(data)
            if n == SMALL_RECV:
                data = read_rest(self.sock.recv, data)
                n = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._recv_size = SMALL_RECV if n < SMALL_RECV else RECV_SIZE
        if self.closing:  # lingering: input after close is read and dropped
            if not n:
                self._finish(None)
            return
        loop = self.loop
        self.last = loop.now
        if n:
            self.bytes_in += n
            try:
                self.handler.data_received(data)
            except Exception:
                self.dispatch_failed("data_received")
            return
        self._eof_received()

    def _eof_received(self) -> None:
        self._eof = True
        try:
            self.handler.eof_received()
        except Exception:
            self.dispatch_failed("eof_received")
        if not self.closed:  # (closing has taken it out of the poller already)
            self._set_events(self._events & ~READ)

    def on_writable(self) -> None:
        out = self._out
        if not out:
            return
        if len(out) > 1:
            joined = b"".join(out)
            out.clear()
            out.append(joined)
        chunk = out[0]
        try:
            sent = _write(self.fd, chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        self.bytes_out += sent
        self._pending -= sent
        self.last = self.loop.now
        if sent < len(chunk):
            out[0] = memoryview(chunk)[sent:]
        else:
            out.clear()
        if self.closing:
            if not self._pending:
                self._linger()
        elif not self._pending:
            self._set_events(READ if not self._eof else 0)
        elif not self._events & READ and not self._eof and \
                self._pending <= self.loop.config.max_buffer // 2:
            self._set_events(READ | WRITE)

    # -- internals ----------------------------------------------------------------------

    def _set_events(self, events: int) -> None:
        if events != self._events and not self.closed:
            self._events = events
            self.loop.set_events(self, events)

    def _linger(self) -> None:
        """Output is flushed: half-close, then read and drop input until the peer's FIN, so
        the peer reads our last bytes instead of a reset (bounded by LINGER seconds)."""
        if self._eof:
            self._finish(None)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(None)
            return
        self._set_events(READ)
        if self._close_timer is not None:
            self._close_timer.cancel()
        loop = self.loop
        self._close_timer = loop.timers.call_at(loop.now + LINGER, lambda: self._finish(None))

    def _lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        if self.loop.config.access_log:
            self.peer  # noqa: B018 -- remember it for the access log before the socket goes
        self.closed = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._out = None
        self._pending = 0
        self.loop.forget(self)
        # Writes go to the descriptor number, which the next connection accepted may be
        # handed: a stray write now fails with EBADF instead of reaching that one.
        self.fd = -1
        self.sock.close()
        self.finished(exc)


class _EchoConnection(SelectorConnection):
    """The connection of an exact :class:`EchoHandler`: ``on_readable`` sends back what
    it reads itself while nothing is queued, with no handler call per message.

    It repeats the receive of ``SelectorConnection.on_readable`` and the body of
    ``_send_now`` rather than calling them: each call costs a pipelined echo 1-2 % of
    the server's CPU per message. Anything else (output queued, closing) takes the
    general path. It leaves ``_turn`` alone (the loop reads a connection once a turn,
    and an echo handler writes only here): at worst a write from elsewhere in the same
    turn gets a send of its own, and a partial send still queues, so order holds."""

    __slots__ = ()

    def on_readable(self) -> None:
        if self._out or self.closing:
            SelectorConnection.on_readable(self)
            return
        fd = self.fd
        try:
            data = _read(fd, self._recv_size)
            n = len(data)
            if n == SMALL_RECV:
                data = read_rest(self.sock.recv, data)
                n = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not n:
            self._eof_received()
            return
        self._recv_size = SMALL_RECV if n < SMALL_RECV else RECV_SIZE
        self.last = self.loop.now
        self.bytes_in += n
        try:
            sent = _write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        self.bytes_out += sent
        if sent < n:
            self._hold_rest(data, sent)


class SelectorEngine(ServerMixin):
    """The event loop shared by the selector servers.

    Besides the ServerMixin API (``timers``, ``call_soon_threadsafe``), code on the
    loop's thread may read ``now``, the loop's clock at the start of this turn.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.now = time.monotonic()
        self.turn = 0  #: counts the loop's turns; a connection writes directly once per turn
        self.deferred: list[SelectorConnection] = []  # connections with output gathered
        self.loop_thread: int | None = None
        self._conns = 0
        self._accepting = False
        self._accept_pause = 0.0
        self._wheel: IdleWheel | None = None
        self._classic: dict[socket.socket, None] = {}  # sockets of classic handlers' threads
        self._poller = Poller()
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._poller.close()
            raise
        self._selector.close()  # the base's selector: this engine polls through the Poller
        self._selector = self._poller
        self._poller.register(self._wake_r, READ, _Callback(self._on_wakeup))

    # -- the loop -----------------------------------------------------------------------

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Run the event loop until :meth:`shutdown`; ``poll_interval`` is ignored."""
        self._stopped.clear()
        self._serve_thread = self.loop_thread = threading.get_ident()
        self.socket.setblocking(False)
        self._start_serving()
        try:
            self._serving.set()
            while not self._stop_requested:
                self.run_once()
        finally:
            self._stop_serving()
            self._stop_requested = False
            self._serving.clear()
            self._stopped.set()

    def run_once(self, timeout: float | None = None) -> None:
        """One turn of the loop: wait for events or the next timer, then handle them."""
        wait = self._loop_timeout()
        if wait is not None:
            timeout = wait if timeout is None else min(timeout, wait)
        poller = self._poller
        events = poller.poll(-1 if timeout is None else timeout)
        self.now = time.monotonic()
        self.turn += 1
        objects, readable, writable = poller.objects, poller.readable, poller.writable
        only_readable = poller.only_readable
        for fd, mask in events:
            obj = objects.get(fd)
            if obj is None:  # closed by an earlier event of this batch
                continue
            if mask == only_readable:  # the common case, in one comparison
                obj.on_readable()
                continue
            if mask & readable:
                obj.on_readable()
            if mask & writable and not obj.closed:
                obj.on_writable()
        self.run_scheduled()
        if self.deferred:
            self._send_deferred()

    def write_all(self, conns: Any, data: bytes, room: int) -> list[Any] | None:
        """The push fan-out (``Hub.deliver``): hand ``data`` to every connection of
        ``conns`` as ``conn.write`` would (a direct ``send`` to each idle connection,
        the first time in this turn; queued or gathered otherwise), in one tight loop
        without a method call per connection. Returns the connections whose unsent
        output is over ``room`` (untouched: the slow-consumer policy decides them), or
        None. From another thread, each write is handed to the loop instead."""
        if _thread_id() != self.loop_thread:
            return write_each(conns, data, room)
        turn = self.turn
        size = len(data)
        slow = None
        plain = SelectorConnection  # TLS connections and UDP peers take their own path
        for conn in conns:
            if type(conn) is plain and conn._out is None and conn._turn != turn \
                    and not conn.closing:
                conn._turn = turn
                try:
                    sent = _write(conn.fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    conn._lost(exc)
                    continue
                conn.bytes_out += sent
                if sent < size:
                    conn._hold_rest(data, sent)
            elif conn.buffered > room:
                if slow is None:
                    slow = []
                slow.append(conn)
            else:
                conn.gather(data)
        return slow

    def _send_deferred(self) -> None:
        """Send what connections gathered this turn, one call per connection."""
        deferred, self.deferred = self.deferred, []
        for conn in deferred:
            if not conn.closed and conn._out and not conn._events & WRITE:
                conn.on_writable()
                if conn._out and not conn.closed:
                    conn._set_events(conn._events | WRITE)

    def publish(self, channel: str | bytes, payload: str | bytes) -> int:
        """As :meth:`ServerMixin.publish`; from another thread the whole fan-out is
        handed to the loop at once (validated here, so errors still raise here), and
        the count returned is of the subscribers at the time of the call."""
        if self.loop_thread is None or threading.get_ident() == self.loop_thread:
            return self.hub.publish(channel, payload)
        channel_bytes, line = encode_message(channel, payload, self.hub.max_message)
        self.call_soon_threadsafe(self.hub.publish_line, channel_bytes, line)
        return self.hub.subscribers(channel_bytes)

    def _on_wakeup(self) -> None:
        self._drain_wakeup()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._poller.register(fd, READ, _Callback(callback))

    def unwatch(self, fd: int) -> None:
        self._poller.unregister(fd)

    def set_events(self, conn: SelectorConnection, events: int) -> None:
        poller = self._poller
        if events:
            if conn.fd in poller:
                poller.modify(conn.fd, events, conn)
            else:
                poller.register(conn.fd, events, conn)
        elif conn.fd in poller:
            poller.unregister(conn.fd)

    def forget(self, conn: Any) -> None:
        """A connection is closed: take it out of the loop and free its slot."""
        # Unregistered although closing the socket would do it too: a process forked
        # meanwhile (multiprocessing) may hold the file, whose events would then go
        # on waking the loop.
        if getattr(conn, "fd", None) is not None and conn.fd in self._poller:
            self._poller.unregister(conn.fd)
        if conn is not None:
            self.release_peer(conn.sock)  # the per-address count of verify_request
        self._conns -= 1
        self.stats.closed()
        self.slot_freed()

    def slot_freed(self) -> None:
        """A connection ended (or a PROXY header wait): accept again if the limit paused it."""
        if not self._accepting and not self._stop_requested and not self._closing_down:
            self._update_accepting()

    # -- accepting (overridden for UDP) -------------------------------------------------

    _closing_down = False

    def _start_serving(self) -> None:
        if self.config.idle_timeout:
            self._wheel = IdleWheel(self.timers, self.config.idle_timeout, self._expire_idle)
        self._update_accepting()

    def _stop_serving(self) -> None:
        self._set_accepting(False)

    def has_capacity(self) -> bool:
        return self._conns + len(self._header_waits) < self.config.max_connections

    def _update_accepting(self) -> None:
        # self.now is this turn's start: the back-off timer, run later in the turn, must
        # not find its own pause still on (nothing else might end it).
        pause = self._accept_pause
        paused = pause > self.now and pause > time.monotonic()
        self._set_accepting(self.has_capacity() and not paused and not self._stop_requested
                            and not self._closing_down)  # (a timer may fire while closing)

    #: set by a supervisor: the listener is shared with other worker processes
    shared_listener = False
    #: set by a supervisor: the listener is this worker's own SO_REUSEPORT socket
    own_listener = False

    def _set_accepting(self, on: bool) -> None:
        if on != self._accepting:
            self._accepting = on
            if on:
                if self.socket.fileno() == -1:  # closed at the limit: join the group again
                    self._reopen_listener()
                self._poller.register(self.socket.fileno(), READ, _Callback(self._accept),
                                      exclusive=self.shared_listener)
            else:
                self._poller.unregister(self.socket.fileno())
                if self.own_listener and not self._stop_requested and \
                        self._conns >= self.config.max_connections:
                    # The kernel hashes new connections to every SO_REUSEPORT socket of
                    # the port, full or not: leave the group until a slot frees, so none
                    # waits here while other workers have room. (_accept has emptied its
                    # queue; with net.ipv4.tcp_migrate_req=1 the kernel would move any
                    # connection that arrives in between to another worker.)
                    self.socket.close()

    def _reopen_listener(self) -> None:
        from .listeners import bind_listener

        self.socket = bind_listener(self.config.replace(port=self.server_address[1]),
                                    reuse_port=True)
        self.socket.setblocking(False)

    def _accept(self) -> None:
        listener = self.socket
        max_conns = self.config.max_connections
        proxied = self.config.proxy_protocol
        waits = self._header_waits  # proxy_protocol: connections waiting for a header
        # An own SO_REUSEPORT listener is closed at the limit: first take what the
        # kernel already queued on it (a few over the limit), or closing would reset them.
        drain = self.own_listener
        # socket.accept() without its two IntEnum conversions per call: a fifth of the
        # Python time of a short connection. (_accept is the C call that accept() wraps.)
        accept = listener._accept
        family, kind, proto = int(listener.family), int(listener.type), listener.proto
        accepted = 0
        while True:
            full = self._conns + len(waits) >= max_conns
            if (full and not drain) or (accepted >= ACCEPT_BATCH and not full):
                break
            accepted += 1
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in RESOURCE_ERRORS:
                    self._back_off(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self._accept_pause_step = 0.0
            sock = socket.socket(family, kind, proto, fd)
            if proxied:
                expect_header(self, sock, addr)  # then verify_request, serve_admitted
            elif self.verify_request(sock, addr):
                self.serve_admitted(sock, addr)
            else:
                sock.close()
        self._update_accepting()

    def serve_admitted(self, request: Any, client_address: Any, proxied: bool = False) -> None:
        """Serve an admitted connection: on the loop (as the ``client_address`` its
        PROXY header named, when ``proxied``), or a classic handler in a thread."""
        self._conns += 1
        self.stats.opened()
        if self.handler_class is None:
            self._serve_classic(request, client_address)
            return
        request.setblocking(False)
        if self.address_family in (socket.AF_INET, socket.AF_INET6):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._start_connection(request, self.handler_class, client_address if proxied else None)

    _accept_pause_step = 0.0
    _last_resource_log = 0.0

    def _back_off(self, exc: OSError) -> None:
        """Out of descriptors or memory: stop accepting for a while, doubling up to 1 s."""
        step = self._accept_pause_step = min(1.0, max(0.01, self._accept_pause_step * 2))
        self._accept_pause = self.now + step
        self._set_accepting(False)
        if self.now - self._last_resource_log >= 1.0:
            self._last_resource_log = self.now
            log.warning("accept failed (%s): pausing accepting for %.2fs, %d connections open",
                        exc.strerror or exc, step, self._conns)
        self.timers.call_at(self._accept_pause, self._update_accepting)

    def _start_connection(self, sock: socket.socket, handler_class: type,
                          peer: Any = None) -> None:
        if self.tls_context is not None:  # connection_made follows the handshake
            from .tls import start_tls_connection  # that module imports this one

            start_tls_connection(self, sock, handler_class, peer)
            return
        # (Not on TLS, whose write() encrypts: it returned above.)
        cls = _EchoConnection if handler_class is EchoHandler else SelectorConnection
        conn = cls(self, sock, handler_class, peer)
        self._poller.register(conn.fd, READ, conn)
        if self._wheel is not None:
            self._wheel.add(conn)
        try:
            conn.handler.connection_made()
        except Exception:
            conn.dispatch_failed("connection_made")

    def _expire_idle(self, conn: SelectorConnection) -> None:
        log.debug("closing %s: idle for %ss", format_address(conn.peer), self.config.idle_timeout)
        conn.close()

    def _serve_classic(self, sock: socket.socket, addr: Any) -> None:
        """A classic (blocking) handler gets a thread of its own."""
        def run() -> None:
            try:
                self.finish_request(sock, addr)
            except Exception:
                self.handle_error(sock, addr)
            finally:
                self.shutdown_request(sock)
                self.call_soon_threadsafe(self.forget, None)

        self._classic[sock] = None
        threading.Thread(target=run, daemon=True).start()

    def shutdown_request(self, request: Any) -> None:
        self._classic.pop(request, None)
        super().shutdown_request(request)

    # -- closing ------------------------------------------------------------------------

    def live_count(self) -> int:
        return self._conns

    def _connections(self) -> list[Any]:
        return [obj for obj in self._poller.objects.values() if isinstance(obj, Connection)]

    def end_input(self) -> None:
        self._closing_down = True
        self._set_accepting(False)
        for conn in self._connections():
            if not conn.closing:
                try:
                    conn.sock.shutdown(socket.SHUT_RD)  # what is queued is read, then EOF
                except OSError:
                    conn.abort()
        for sock in list(self._classic):
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def abort_all(self) -> None:
        for conn in self._connections():
            conn.abort()
        for sock in list(self._classic):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_idle(self, deadline: float) -> bool:
        """Run the loop (in the calling thread) until every connection is gone."""
        self.loop_thread = threading.get_ident()
        while self._conns > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.run_once(remaining)
        return True


class SelectorTCPServer(SelectorEngine, socketserver.TCPServer):
    """The ``select`` engine over TCP; constructor as ``socketserver.TCPServer``."""


class LoopPeer(DatagramPeer):
    """A UDP peer on the event loop: writes go straight to the non-blocking socket."""

    closed = False

    def __init__(self, server: Any, handler_class: type, peer: Any) -> None:
        super().__init__(server, handler_class, peer)
        self.last = server.now

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.server.call_soon_threadsafe(self.server.end_peer, self)

    abort = close


class SelectorUDPServer(SelectorEngine, socketserver.UDPServer):
    """The ``select`` engine over UDP: one handler per peer address, expired after
    ``udp_idle`` seconds of silence. At ``max_connections`` peers, datagrams from new
    peers are dropped (and counted)."""

    allow_reuse_address = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._peers: dict[Any, LoopPeer] = {}
        super().__init__(*args, **kwargs)

    def _start_serving(self) -> None:
        if self.config.udp_idle:
            self._wheel = IdleWheel(self.timers, self.config.udp_idle, self.end_peer)
        self._set_accepting(True)

    def _update_accepting(self) -> None:
        pass  # a UDP socket is always read: known peers keep talking at the limit

    def forget(self, conn: Any) -> None:
        self._conns -= 1
        self.stats.closed()

    def _accept(self) -> None:
        sock = self.socket
        peers = self._peers
        handler_class = self.handler_class
        now = self.now
        for _ in range(DATAGRAM_BATCH):
            try:
                data, addr = sock.recvfrom(self.max_packet_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued by an earlier send
            if not self.verify_request((data, sock), addr):
                continue  # allow/deny: dropped (and counted)
            if handler_class is None:
                self._handle_classic((data, sock), addr)
                continue
            peer = peers.get(addr)
            if peer is None:
                if self._conns >= self.config.max_connections:
                    self.stats.drop()
                    continue
                peer = self._new_peer(addr)
                if peer is None:
                    continue
            peer.last = now
            peer.received(data)

    def _new_peer(self, addr: Any) -> LoopPeer | None:
        peer = LoopPeer(self, self.handler_class, addr)
        self._peers[addr] = peer
        self._conns += 1
        self.stats.opened()
        if self._wheel is not None:
            self._wheel.add(peer)
        if not peer.dispatch("connection_made"):
            return None
        return peer

    def _handle_classic(self, request: Any, addr: Any) -> None:
        try:
            self.finish_request(request, addr)
        except Exception:
            self.handle_error(request, addr)

    def end_peer(self, peer: LoopPeer) -> None:
        """Forget a peer (expired or closed) and tell its handler."""
        if peer.closed:
            return
        peer.closed = True
        peer.closing = True
        if self._peers.get(peer.peer) is peer:
            del self._peers[peer.peer]
        self.forget(peer)
        peer.finished(None)

    def end_input(self) -> None:
        self._set_accepting(False)
        for peer in list(self._peers.values()):
            self.end_peer(peer)

    abort_all = end_input
