"""The connection handle a Handler sees as ``self.conn``; engines implement it."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handlers import Handler

__all__ = ["Connection"]

log = logging.getLogger("sockserv")
access_log = logging.getLogger("sockserv.access")


def format_address(address: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6), or the path of a Unix socket."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) if address else "-"


class Connection:
    """One TCP connection or one UDP peer, as its handler sees it.

    A handler uses: ``peer`` and ``local`` (addresses), ``server`` (``.config``,
    ``.stats``), ``write(data)``, ``close()``, ``closing``, ``buffered``, and over
    TLS ``peer_cert``.
    ``write`` never blocks the engine and is safe from any thread; ``close``
    flushes what was written, then closes.

    Engines subclass it and implement ``write`` and ``close``; they drive the
    handler through :meth:`dispatch`, which turns a handler exception into a
    logged traceback and an aborted connection.
    """

    __slots__ = ()  # engines may use slots; subclasses without them get a __dict__

    datagram = False  #: True for a UDP peer: each data_received is one whole datagram
    #: over TLS with ``tls_ca``: the client's verified certificate, as
    #: ``ssl.SSLSocket.getpeercert()`` gives it; otherwise None
    peer_cert: dict[str, Any] | None = None

    def __init__(self, server: Any, handler_class: type[Handler], peer: Any, local: Any) -> None:
        self.server = server
        self.peer = peer
        self.local = local
        self.closing = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()
        self.handler = handler_class(self)

    @property
    def buffered(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return 0

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def gather(self, data: bytes) -> None:
        """Like ``write``, for fan-out: an engine may hold the data briefly to send it
        with the connection's other output in one call (the select engine does, until
        the end of its loop turn). By default the same as ``write``."""
        self.write(data)

    def abort(self) -> None:
        """Close at once, dropping unsent output."""
        self.close()

    def dispatch(self, callback: str, *args: Any) -> bool:
        """Call a handler callback; on an exception log it once, abort, return False."""
        try:
            getattr(self.handler, callback)(*args)
            return True
        except Exception:
            self.dispatch_failed(callback)
            return False

    def dispatch_failed(self, callback: str) -> None:
        """The handler's ``callback`` raised (call it from the ``except`` block): log the
        traceback once and abort the connection."""
        log.exception("handler %s.%s failed for %s; closing it",
                      type(self.handler).__name__, callback, format_address(self.peer))
        self.abort()

    def finished(self, exc: BaseException | None = None) -> None:
        """Tell the handler the connection is gone, count it, write the access log line."""
        try:
            self.handler.connection_lost(exc)
        except Exception:
            log.exception("handler %s.connection_lost failed for %s",
                          type(self.handler).__name__, format_address(self.peer))
        server = self.server
        stats = getattr(server, "stats", None)
        if stats is not None:
            stats.add_traffic(self.bytes_in, self.bytes_out)
        if getattr(server.config, "access_log", False):
            access_log.info("%s in=%d out=%d duration=%.3fs", format_address(self.peer),
                            self.bytes_in, self.bytes_out, time.monotonic() - self.started)
