"""The handler API shared by every engine, TCP and UDP.

Engines call, on one handler instance per TCP connection or per UDP peer:
``connection_made()``, ``data_received(data)`` for each chunk or datagram,
``eof_received()`` when a TCP client half-closes, ``connection_lost(exc)`` once
at the end. The handler talks back through ``self.conn``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .framing import LineFramer

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Handler", "LineHandler", "EchoHandler"]


class Handler:
    """Base class for sockserv handlers.

    A subclass may override: ``connection_made``, ``data_received``,
    ``eof_received`` (the default closes once output is flushed) and
    ``connection_lost``. It uses ``self.conn``: ``peer``, ``local``,
    ``write(data)``, ``close()``, ``server``.
    """

    # ``conn`` in a slot keeps an idle handler small; other attributes go to __dict__.
    __slots__ = ("conn", "__dict__")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def connection_made(self) -> None:
        """The connection (or the first datagram of a UDP peer) has arrived."""

    def data_received(self, data: bytes) -> None:
        """Bytes arrived (over UDP: one whole datagram)."""

    def eof_received(self) -> None:
        """The TCP client shut its write side. The default closes after flushing."""
        self.conn.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is closed (UDP: the peer expired); ``exc`` is the error, if any."""


class LineHandler(Handler):
    """A handler for line protocols: override ``line_received(line)``.

    Lines end in ``\\n`` (``\\r\\n`` accepted) and arrive without the terminator.
    Over UDP each datagram is framed on its own. ``max_line`` (class attribute;
    default: the server's ``max_line`` setting) bounds a line; a longer one calls
    ``line_too_long()``, which by default answers ``-ERR line too long`` and closes.
    """

    max_line: int | None = None
    _framer: LineFramer | None = None

    def line_received(self, line: bytes) -> None:
        """One complete line arrived, without its terminator."""
        raise NotImplementedError(f"{type(self).__name__} must define line_received")

    def line_too_long(self) -> None:
        self.conn.write(b"-ERR line too long\n")
        self.conn.close()

    def data_received(self, data: bytes) -> None:
        framer = self._framer
        if framer is None:
            framer = self._framer = LineFramer(self.max_line or self.conn.server.config.max_line)
        for line in framer.feed(data):
            if self.conn.closing:
                return
            self.line_received(line)
        if framer.too_long and not self.conn.closing:
            self.line_too_long()
        elif self.conn.datagram:
            tail = framer.flush()  # a datagram is a whole message: its last line needs no "\n"
            if tail and not self.conn.closing:
                self.line_received(tail)

    def eof_received(self) -> None:
        if self._framer is not None and not self.conn.closing:
            tail = self._framer.flush()
            if tail:
                self.line_received(tail)
        super().eof_received()


class EchoHandler(Handler):
    """RFC 862 echo: every byte (TCP) or datagram (UDP) goes back as it came.

    After a TCP client half-closes, what is left is flushed and the connection closed.
    """

    def data_received(self, data: bytes) -> None:
        self.conn.write(data)
