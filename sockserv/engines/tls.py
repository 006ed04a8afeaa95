"""TLS connections for every engine, over :class:`sockserv.tls.TLSSession` (sans-IO).

The engines keep moving raw bytes on the socket exactly as without TLS; a TLS
connection feeds what arrives into its session and hands the records the
session produces to the engine's ordinary write path. So:

- ``thread`` and ``fork`` (:func:`serve_tls`, in the connection's own thread or
  child, never in the accept loop): the handshake runs with a deadline of
  ``tls_handshake_timeout`` (a socket timeout for the handshake only, then the
  socket is blocking again); then :class:`TLSStreamConnection` reads with a
  blocking ``recv`` and decrypts, and writes by encrypting and sending the
  records with ``MSG_DONTWAIT``, the rest through the process's flusher thread,
  as :class:`~sockserv.engines.blocking.StreamConnection` does. The reader and the
  writers share the session under a lock held only for in-memory work.
- ``select`` (:class:`TLSSelectorConnection`): the handshake advances on
  readiness like any other input, so a client that stalls mid-handshake costs
  the loop nothing; a loop timer closes it after ``tls_handshake_timeout``.
- A classic ``socketserver`` handler gets an ``ssl.SSLSocket`` (blocking, in
  its own thread or child) as its ``request``.

The handler's ``connection_made`` comes once the handshake is complete
(``conn.peer_cert`` is then known); a failed handshake never reaches the
handler and is logged at most once a second. A close_notify from the client
is its end of input (``eof_received``), as is the raw stream ending without
one; ``close()`` sends close_notify after the output. ``bytes_in`` and
``bytes_out`` count the handler's plaintext, not the records on the wire.
"""

from __future__ import annotations

import functools
import logging
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from ..tls import TLSSession, handshake_failed
from .blocking import RECV_SIZE, StreamConnection, serve_stream
from .selector import READ, SelectorConnection

__all__ = ["TLSSelectorConnection", "TLSStreamConnection", "serve_tls",
           "start_tls_connection"]

log = logging.getLogger("sockserv")


class _TLS:
    """What both TLS connections add to their engine's connection: ``peer_cert``, and
    ``bytes_out`` counting the handler's plaintext instead of the records on the wire."""

    __slots__ = ()
    session: TLSSession
    _app_out: int

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        """The client's verified certificate (``getpeercert()``), or None."""
        return self.session.peer_cert

    @property
    def bytes_out(self) -> int:  # type: ignore[override]
        """Plaintext bytes the handler wrote (the records on the wire are not counted)."""
        return self._app_out

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        pass  # the engine's raw write path counts records: the plaintext is counted in write()


# -- thread and fork engines ----------------------------------------------------------


class TLSStreamConnection(_TLS, StreamConnection):
    """A TLS connection of the thread and fork engines (see the module doc)."""

    def __init__(self, server: Any, handler_class: type, sock: socket.socket, peer: Any,
                 session: TLSSession) -> None:
        self.session = session
        self._tls_lock = threading.Lock()  # taken before StreamConnection's own lock
        self._app_out = 0
        super().__init__(server, handler_class, sock, peer)

    def write(self, data: bytes) -> None:
        if not data or self.closing:
            return
        with self._tls_lock:
            if self._broken:
                return
            try:
                records = self.session.encrypt(data)
            except ssl.SSLError:  # the session failed (older OpenSSL, after a ragged EOF)
                self.abort()
                return
            self._app_out += len(data)
            self._send(records)

    def receive(self, size: int = RECV_SIZE) -> bytes:
        session = self.session
        while True:
            with self._tls_lock:
                data, ended = session.read()
                out = session.data_to_send()  # e.g. a key update's answer
                if out:
                    self._send(out)
            if data or ended:
                return data
            raw = self.sock.recv(RECV_SIZE)  # no lock held: writers go on meanwhile
            with self._tls_lock:
                if raw:
                    session.feed(raw)
                else:
                    session.feed_eof()

    def finish_output(self) -> None:
        with self._tls_lock:
            notify = self.session.close_notify()
            if notify:
                self._send(notify)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _handshake(server: Any, sock: socket.socket, peer: Any) -> TLSSession | None:
    """Run the server side of the handshake on the blocking ``sock``, bounded by
    ``tls_handshake_timeout``; the session, or None (logged) when it failed."""
    session = TLSSession(server.tls_context)
    limit = server.config.tls_handshake_timeout
    deadline = time.monotonic() + limit if limit else None
    try:
        while not session.handshake():
            out = session.data_to_send()
            if out:
                sock.settimeout(_remaining(deadline))
                sock.sendall(out)
            sock.settimeout(_remaining(deadline))
            raw = sock.recv(RECV_SIZE)
            if raw:
                session.feed(raw)
            else:
                session.feed_eof()
        out = session.data_to_send()  # the last flight (TLS 1.3: session tickets too)
        if out:
            sock.settimeout(_remaining(deadline))
            sock.sendall(out)
    except OSError as exc:  # ssl.SSLError, TimeoutError, resets
        alert = session.data_to_send()
        if alert:
            try:
                sock.setblocking(False)
                sock.send(alert)
            except OSError:
                pass
        handshake_failed(peer, exc, session)
        return None
    finally:
        try:
            sock.settimeout(None)  # blocking again: the engine's write path needs it so
        except OSError:
            pass
    return session


def serve_tls(server: Any, sock: socket.socket, peer: Any, handler_class: type | None,
              register: Any = None) -> None:
    """Serve one accepted TCP connection over TLS in the calling thread (thread and
    fork engines, a classic handler's thread on select, inetd): handshake, then the
    sockserv ``handler_class`` as :func:`serve_stream` runs it, or, with
    ``handler_class`` None, the server's classic handler on an ``ssl.SSLSocket``.
    The caller closes ``sock`` afterwards."""
    if handler_class is None:
        _serve_classic(server, sock, peer)
        return
    session = _handshake(server, sock, peer)
    if session is not None:
        serve_stream(server, sock, peer, handler_class, register,
                     functools.partial(TLSStreamConnection, session=session))


def _serve_classic(server: Any, sock: socket.socket, peer: Any) -> None:
    """A classic handler over an ``SSLSocket`` made on a duplicate of ``sock``, so that
    the engine's own shutdowns of ``sock`` (stop, abort) still reach the connection."""
    tls_sock = server.tls_context.wrap_socket(sock.dup(), server_side=True,
                                              do_handshake_on_connect=False)
    try:
        tls_sock.settimeout(server.config.tls_handshake_timeout or None)
        try:
            tls_sock.do_handshake()
        except OSError as exc:
            handshake_failed(peer, exc)
            return
        tls_sock.settimeout(None)
        socketserver.BaseServer.finish_request(server, tls_sock, peer)
        try:  # close_notify, without waiting for the client's
            tls_sock.setblocking(False)
            tls_sock.unwrap()
        except (OSError, ValueError):
            pass
    finally:
        tls_sock.close()


# -- the select engine -------------------------------------------------------------


class TLSSelectorConnection(_TLS, SelectorConnection):
    """A TLS connection on the event loop (see the module doc)."""

    __slots__ = ("session", "_app_out", "_timer", "_made")

    def __init__(self, loop: Any, sock: socket.socket, handler_class: type,
                 peer: Any = None) -> None:
        self.session = TLSSession(loop.tls_context)
        self._app_out = 0
        self._made = False  # connection_made was called (after the handshake)
        super().__init__(loop, sock, handler_class, peer)
        limit = loop.config.tls_handshake_timeout
        self._timer = loop.timers.call_at(loop.now + limit, self._handshake_expired) \
            if limit else None

    def write(self, data: bytes) -> None:
        records = self._seal(data, self.write)
        if records:
            SelectorConnection.write(self, records)

    def gather(self, data: bytes) -> None:
        records = self._seal(data, self.gather)
        if records:
            SelectorConnection.gather(self, records)

    def close(self) -> None:
        if self.closing:
            return
        if threading.get_ident() != self.loop.loop_thread:
            self.loop.call_soon_threadsafe(self.close)
            return
        if not self.session.established:
            self.abort()  # nothing to flush, nobody to tell
            return
        self._send_raw(self.session.close_notify())
        SelectorConnection.close(self)

    def on_readable(self) -> None:
        try:
            raw = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not self.session.established:
                handshake_failed(self.peer, exc, self.session)
            self._lost(exc)
            return
        if self.closing:  # lingering: input after close is read and dropped
            if not raw:
                self._finish(None)
            return
        self.last = self.loop.now
        session = self.session
        if raw:
            session.feed(raw)
        else:
            session.feed_eof()
        try:
            if not session.established:
                done = session.handshake()
                self._send_raw(session.data_to_send())
                if not done:
                    return
                self._established()
                if self.closing:
                    return
            data, ended = session.read()
        except ssl.SSLError as exc:
            self._failed(exc)
            return
        self._send_raw(session.data_to_send())
        if data:
            self.bytes_in += len(data)
            try:
                self.handler.data_received(data)
            except Exception:
                self.dispatch_failed("data_received")
                return
        if ended and not self._eof and not self.closed:
            self._eof = True
            self._set_events(self._events & ~READ)
            if not self.closing:
                try:
                    self.handler.eof_received()
                except Exception:
                    self.dispatch_failed("eof_received")

    def finished(self, exc: BaseException | None = None) -> None:
        if self._made:  # a handshake that failed never reached the handler
            super().finished(exc)

    # -- internals ----------------------------------------------------------------------

    def _seal(self, data: bytes, again: Any) -> bytes | None:
        """The records that carry the handler's ``data``; None when there is nothing to
        send now: closing, before connection_made, or called from another thread (then
        ``again(data)`` is handed to the loop)."""
        if self.closing or not data:
            return None
        if threading.get_ident() != self.loop.loop_thread:
            self.loop.call_soon_threadsafe(again, bytes(data))
            return None
        if not self._made:
            return None  # no handler has the connection before connection_made
        try:
            records = self.session.encrypt(data)
        except ssl.SSLError as exc:  # the session failed (older OpenSSL, after a ragged EOF)
            self._lost(exc)
            return None
        self._app_out += len(data)
        return records

    def _send_raw(self, raw: bytes) -> None:
        if raw and not self.closing:
            SelectorConnection.write(self, raw)

    def _established(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._made = True
        try:
            self.handler.connection_made()
        except Exception:
            self.dispatch_failed("connection_made")

    def _failed(self, exc: ssl.SSLError) -> None:
        if self.session.established:  # a broken record: the handler learns it
            log.debug("tls: %s broke the protocol: %s", self.peer, exc)
            self._lost(exc)
            return
        handshake_failed(self.peer, exc, self.session)
        self._send_raw(self.session.data_to_send())  # the alert, then close
        SelectorConnection.close(self)

    def _handshake_expired(self) -> None:
        self._timer = None
        if not self.closed and not self.session.established:
            handshake_failed(self.peer, TimeoutError("timed out"), self.session)
            self.abort()

    def _finish(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        SelectorConnection._finish(self, exc)


def start_tls_connection(loop: Any, sock: socket.socket, handler_class: type,
                         peer: Any = None) -> None:
    """Put a newly accepted TCP connection on the select engine's loop as a TLS one; its
    handler's ``connection_made`` follows the handshake. ``peer``: as for
    :class:`~sockserv.engines.selector.SelectorConnection` (None: ask the kernel)."""
    conn = TLSSelectorConnection(loop, sock, handler_class, peer)
    loop._poller.register(conn.fd, READ, conn)
    if loop._wheel is not None:
        loop._wheel.add(conn)
