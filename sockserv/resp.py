"""RESP2, the Redis wire protocol, apart from any I/O (pure): an encoder for commands
and an incremental parser for replies. What :mod:`sockserv.bus` speaks to Redis.

A command is an array of bulk strings: ``encode_command(b"PUBLISH", channel, data)``.
A reply is one of (RESP2 type -> Python value)::

    +simple string   -> str          (e.g. "OK", "PONG")
    -error           -> ReplyError   (an Exception instance, returned, not raised)
    :integer         -> int
    $bulk string     -> bytes        ($-1: None)
    *array           -> list         (*-1: None), elements of any of these types

:class:`Parser` takes bytes as they come off the socket, split anywhere, and gives
back the replies completed so far, in order.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Parser", "ProtocolError", "ReplyError", "encode_command"]

MAX_BULK = 512 << 20  #: the longest bulk string Redis sends (its proto-max-bulk-len default)
MAX_ARRAY = 1 << 32
MAX_LINE = 64 << 10  #: the longest type line (+, -, :, $, *) accepted before its CRLF


class ProtocolError(Exception):
    """The bytes are not RESP2: the connection cannot be used any more."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``, ``-WRONGPASS ...``); ``str()`` is its text."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyError) and self.args == other.args

    def __hash__(self) -> int:
        return hash(self.args)


def _arg(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    raise TypeError(f"a command argument must be bytes, str or int, not {type(value).__name__}")


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as RESP2: an array of bulk strings (str as UTF-8, int in decimal)."""
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Incomplete(Exception):
    """More bytes are needed (internal)."""


_INCOMPLETE = _Incomplete()


class Parser:
    """Incremental RESP2 reply parser: ``feed(data)`` returns the replies it completes.

    Bytes may be split anywhere; the replies are the same whatever the split. A
    reply not yet complete stays buffered (an array is parsed again from its start
    when more bytes come, which costs little for the short arrays Redis sends).
    Raises :class:`ProtocolError` for bytes that are not RESP2; the parser is then
    unusable.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete reply."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return every reply now complete, in order (maybe none)."""
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(buf):
            del buf[:self._pos]
            self._pos = 0
        buf += data
        replies = []
        while self._pos < len(buf):
            try:
                reply, self._pos = self._parse(self._pos)
            except _Incomplete:
                break
            replies.append(reply)
        return replies

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE:
                raise ProtocolError(f"no CRLF in the first {MAX_LINE} bytes of a reply line")
            raise _INCOMPLETE
        return bytes(self._buf[pos:end]), end + 2

    def _integer(self, text: bytes, what: str) -> int:
        # int() would also take spaces, underscores and a '+': RESP has none of those.
        digits = text[1:] if text[:1] == b"-" else text
        if not digits or not digits.isdigit() or len(digits) > 20:
            raise ProtocolError(f"bad {what} {text[:40]!r}")
        return int(text)

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        if pos >= len(buf):
            raise _INCOMPLETE
        kind = buf[pos]
        line, pos = self._line(pos + 1)
        if kind == 0x24:  # $ bulk string
            size = self._integer(line, "bulk length")
            if size == -1:
                return None, pos
            if not 0 <= size <= MAX_BULK:
                raise ProtocolError(f"bad bulk length {size}")
            end = pos + size
            if len(buf) < end + 2:
                raise _INCOMPLETE
            if buf[end:end + 2] != b"\r\n":
                raise ProtocolError("a bulk string does not end in CRLF")
            return bytes(buf[pos:end]), end + 2
        if kind == 0x2A:  # * array
            count = self._integer(line, "array length")
            if count == -1:
                return None, pos
            if not 0 <= count <= MAX_ARRAY:
                raise ProtocolError(f"bad array length {count}")
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        if kind == 0x2B:  # + simple string
            return line.decode("utf-8", "replace"), pos
        if kind == 0x2D:  # - error
            return ReplyError(line.decode("utf-8", "replace")), pos
        if kind == 0x3A:  # : integer
            return self._integer(line, "integer"), pos
        raise ProtocolError(f"unknown reply type {bytes([kind])!r}")
