"""The PROXY protocol on every engine (``proxy_protocol = true``).

One path for all of them, in the serve loop (the select engine's event loop, or
the socketserver-style loop of the thread and fork engines), so that the
address a header carries is known where ``allow``/``deny`` and
``max_connections_per_ip`` are checked and counted (the fork engine's parent):

1. accept: a peer outside ``proxy_allow`` is reset at once (a Unix socket peer
   has no address and is trusted: the socket file's permissions decide);
2. the connection waits for its header in a :class:`HeaderWait`, watched by the
   loop like any other descriptor, with a timer of ``proxy_header_timeout``
   (:data:`HEADER_TIMEOUT`) seconds; it holds one of ``max_connections``;
3. each time it is readable, what arrived is peeked at (``MSG_PEEK``) and only
   header bytes are taken off the socket (:class:`sockserv.proxy.HeaderReader`),
   so what follows (a TLS ClientHello, the client's first line) stays for the
   engine; bytes that cannot start a header end it at once;
4. with the header in, the client address it carries goes through
   ``verify_request`` (``allow``, ``deny``, ``max_connections_per_ip``) and on to
   the engine (``serve_admitted``), which serves it with that address as the
   peer. A ``LOCAL`` or ``UNKNOWN`` header (a load balancer's health check) keeps
   the real peer, the trusted load balancer itself, and skips those checks.

A refused connection (untrusted, malformed, late) is reset, counted in
``stats.proxy_refused`` and logged at most once a second. A trusted peer that
closes before sending a byte (a plain TCP health check) is only a debug line.
A connection passed by systemd with ``Accept=yes`` reads its header the same
way, blocking (:func:`receive_header`).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from ..access import AccessRules
from ..connection import format_address
from ..proxy import HeaderReader, ProxyError, ProxyHeader

__all__ = ["HEADER_TIMEOUT", "HeaderWait", "close_waits", "expect_header", "receive_header"]

log = logging.getLogger("sockserv")

#: seconds a trusted peer has to send its whole header (the spec asks for at
#: least 3, to cover a TCP retransmit; a load balancer sends it at once)
HEADER_TIMEOUT = 5.0


def untrusted(server: Any, address: Any) -> str | None:
    """Why ``address`` may not send a header (None: it may): outside ``proxy_allow``."""
    if not isinstance(address, tuple):
        return None  # a Unix socket peer: whoever may open the socket file is trusted
    config = server.config
    cached_config, rules = server._proxy_rules
    if cached_config is not config:
        rules = AccessRules(config.proxy_allow)
        server._proxy_rules = (config, rules)
    return None if rules.permits(address[0]) else "not in proxy_allow"


def expect_header(server: Any, sock: socket.socket, address: Any) -> None:
    """A TCP connection was accepted from ``address``: refuse it if untrusted, else
    wait (in the serve loop) for its header."""
    why = untrusted(server, address)
    if why is not None:
        server.refuse(sock, address, "proxy_refused", why)
        sock.close()
        return
    HeaderWait(server, sock, address)


def _step(sock: socket.socket, reader: HeaderReader, flags: int) -> ProxyHeader | None:
    """Peek at what arrived, take the header's bytes off the socket; the header once
    complete. EOFError: the peer closed first."""
    data = sock.recv(reader.wanted, socket.MSG_PEEK | flags)
    if not data:
        raise EOFError
    consume, header = reader.peeked(data)
    while consume:  # the bytes are there already: this never waits
        taken = len(sock.recv(consume, flags))
        if not taken:
            raise EOFError
        consume -= taken
    return header


def _failed(server: Any, sock: socket.socket, address: Any, reader: HeaderReader,
            exc: BaseException) -> None:
    """The header did not come: refuse (count, log, reset), or only note a peer that
    closed before sending a byte (a health check that connects and leaves)."""
    if isinstance(exc, EOFError | ConnectionError) and not reader.received:
        log.debug("%s closed before sending a PROXY header", format_address(address))
        return
    if isinstance(exc, ProxyError):
        why = f"PROXY protocol: {exc}"
    elif isinstance(exc, TimeoutError):
        why = f"no PROXY header within {server.proxy_header_timeout:g}s"
    elif isinstance(exc, EOFError):
        why = f"closed after {len(reader.received)} byte(s) of a PROXY header"
    else:
        why = f"reading the PROXY header failed: {exc}"
    server.refuse(sock, address, "proxy_refused", why, logging.WARNING)


def admitted_peer(server: Any, sock: socket.socket, address: Any,
                  header: ProxyHeader) -> Any | None:
    """The peer to serve ``sock`` as, after ``verify_request`` on the header's client
    address; None if refused (counted and logged; the caller closes)."""
    if header.source is None:  # LOCAL, UNKNOWN: the trusted load balancer itself
        return address
    if not server.verify_request(sock, header.source):
        return None
    return header.source


class HeaderWait:
    """An accepted connection waiting in the serve loop for its header (see the
    module doc). It registers itself with ``server.watch`` and a timer, and hands
    the connection to ``server.serve_admitted`` once the header is in."""

    __slots__ = ("server", "sock", "fd", "address", "reader", "timer")

    def __init__(self, server: Any, sock: socket.socket, address: Any) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.reader = HeaderReader()
        server._header_waits[self.fd] = self
        server.watch(self.fd, self.on_readable)
        self.timer = server.timers.call_at(time.monotonic() + server.proxy_header_timeout,
                                           self.expired)

    def on_readable(self) -> None:
        if self.sock is None:  # ended earlier in this turn of the loop
            return
        try:
            header = _step(self.sock, self.reader, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, EOFError, ProxyError) as exc:
            self.fail(exc)
            return
        if header is None:
            return
        server, sock = self.server, self.sock
        self.end()
        peer = admitted_peer(server, sock, self.address, header)
        if peer is None:
            sock.close()
            server.slot_freed()
            return
        server.serve_admitted(sock, peer, proxied=True)

    def expired(self) -> None:
        self.timer = None
        if self.sock is not None:
            self.fail(TimeoutError())

    def fail(self, exc: BaseException) -> None:
        server, sock = self.server, self.sock
        self.end()
        _failed(server, sock, self.address, self.reader, exc)
        sock.close()
        server.slot_freed()

    def end(self) -> None:
        """Stop waiting: out of the loop, the timer cancelled (the socket stays open)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.server._header_waits.pop(self.fd, None)
            self.server.unwatch(self.fd)
            self.sock = None


def close_waits(server: Any, in_child: bool = False) -> None:
    """Close every connection still waiting for its header: the server is closing,
    or (``in_child``) a forked child drops its copies (the parent keeps serving
    them, and the loop that watched them is the parent's)."""
    waits, server._header_waits = list(server._header_waits.values()), {}
    for wait in waits:
        sock = wait.sock
        if wait.timer is not None:
            wait.timer.cancel()
        if not in_child:
            try:
                server.unwatch(wait.fd)
            except (KeyError, ValueError, OSError):
                pass
        wait.sock = None
        sock.close()


def receive_header(server: Any, sock: socket.socket, address: Any) -> Any | None:
    """Read the header of a connection served in the calling thread (systemd
    ``Accept=yes``), blocking for at most ``proxy_header_timeout`` seconds; the peer
    to serve it as, or None when refused (counted, logged; the caller closes)."""
    why = untrusted(server, address)
    if why is not None:
        server.refuse(sock, address, "proxy_refused", why)
        return None
    reader = HeaderReader()
    deadline = time.monotonic() + server.proxy_header_timeout
    try:
        header = None
        while header is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            header = _step(sock, reader, 0)
    except (OSError, EOFError, ProxyError) as exc:
        _failed(server, sock, address, reader, exc)
        return None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
    return admitted_peer(server, sock, address, header)
