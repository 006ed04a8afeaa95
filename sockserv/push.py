"""The push service: the wire protocol (pure), the :class:`Hub` (channels and fan-out)
and :class:`PushHandler`, which joins them on a connection.

Protocol (lines end in ``\\n``, ``\\r\\n`` accepted; one reply line per command line,
in order)::

    SUB <channel>            -> +OK
    UNSUB <channel>          -> +OK
    PUB <channel> <payload>  -> +OK     every subscriber of <channel> gets
                                        MSG <channel> <payload>
    PING [text]              -> +PONG [text]
    anything else            -> -ERR <reason>   (the connection stays open)

- Command words are case-insensitive (``sub``, ``Sub`` and ``SUB`` are the same);
  channels and payloads are bytes, taken as they are.
- A channel is 1-128 bytes of ``A-Z a-z 0-9 . _ : -``, case-sensitive.
- ``SUB`` and ``UNSUB`` take exactly one channel; spaces around it are ignored.
  Both are idempotent: subscribing twice delivers once, unsubscribing a channel
  not subscribed is ``+OK``.
- ``PUB``: the channel ends at the next space; the payload is everything after
  that one space, spaces included, and may be empty (``PUB news `` publishes an
  empty payload; ``PUB news`` without the space is a usage error). A publisher
  subscribed to the channel gets its own message too.
- ``PING`` answers ``+PONG`` followed by whatever followed ``PING``.
- ``MSG`` lines may arrive at any time, also between a command and its reply;
  replies (``+OK``, ``+PONG``, ``-ERR``) come in command order.
- Errors: ``-ERR empty line``, ``-ERR unknown command``, ``-ERR bad channel``,
  ``-ERR usage: SUB <channel>`` (``UNSUB``, ``PUB <channel> <payload>`` alike),
  ``-ERR message too long for one datagram`` (UDP, see below), and from
  :class:`~sockserv.LineHandler` ``-ERR line too long`` (then the connection is
  closed), and from the hub ``-ERR slow consumer`` (then closed).
- Over UDP each reply and each ``MSG`` is one datagram (ending in ``\\n``). A
  ``MSG`` line longer than :data:`MAX_DATAGRAM` (65507 bytes, the most an IPv4
  UDP datagram carries) cannot be sent, so such a ``PUB`` gets ``-ERR message
  too long for one datagram`` and nothing is delivered to anyone.
"""

from __future__ import annotations

import datetime
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .config import Config
from .handlers import LineHandler

__all__ = [
    "MAX_DATAGRAM", "Action", "Hub", "PushHandler", "Ticker", "encode_message", "handle_line",
    "valid_channel", "write_each",
]

log = logging.getLogger("sockserv")

MAX_DATAGRAM = 65507  #: the largest UDP payload over IPv4: the bound for a MSG over UDP

# Hub actions (Action.kind)
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
PUBLISH = "publish"
PING = "ping"
NONE = "none"

OK = b"+OK\n"
ERR_EMPTY = b"-ERR empty line\n"
ERR_UNKNOWN = b"-ERR unknown command\n"
ERR_CHANNEL = b"-ERR bad channel\n"
ERR_USAGE_SUB = b"-ERR usage: SUB <channel>\n"
ERR_USAGE_UNSUB = b"-ERR usage: UNSUB <channel>\n"
ERR_USAGE_PUB = b"-ERR usage: PUB <channel> <payload>\n"
ERR_DATAGRAM = b"-ERR message too long for one datagram\n"
ERR_SLOW = b"-ERR slow consumer\n"

_CHANNEL = re.compile(rb"[A-Za-z0-9._:-]{1,128}").fullmatch


class Action(NamedTuple):
    """What a command asks of the hub. ``message`` (PUB only) is the encoded
    ``MSG <channel> <payload>\\n`` line, ready to hand to every subscriber."""

    kind: str
    channel: bytes = b""
    message: bytes = b""


_NO_ACTION = Action(NONE)
_PING_ACTION = Action(PING)


def valid_channel(channel: bytes) -> bool:
    """True for 1-128 bytes of ``[A-Za-z0-9._:-]``."""
    return _CHANNEL(channel) is not None


def handle_line(line: bytes, max_message: int | None = None) -> tuple[bytes, Action]:
    """One command line (terminator stripped) -> (reply line, hub action). Pure.

    ``max_message`` bounds the encoded ``MSG`` line (``MAX_DATAGRAM`` over UDP);
    a ``PUB`` over it gets ``-ERR message too long for one datagram``.
    Never raises, whatever the bytes.
    """
    verb, sep, rest = line.partition(b" ")
    verb = verb.upper()
    if verb == b"PUB":
        channel, sep2, _ = rest.partition(b" ")
        if not sep2:
            return ERR_USAGE_PUB, _NO_ACTION
        if _CHANNEL(channel) is None:
            return ERR_CHANNEL, _NO_ACTION
        message = b"MSG " + rest + b"\n"  # rest is "<channel> <payload>": encoded once, here
        if max_message is not None and len(message) > max_message:
            return ERR_DATAGRAM, _NO_ACTION
        return OK, Action(PUBLISH, channel, message)
    if verb == b"SUB" or verb == b"UNSUB":
        args = rest.split()
        if len(args) != 1:
            return (ERR_USAGE_SUB if verb == b"SUB" else ERR_USAGE_UNSUB), _NO_ACTION
        if _CHANNEL(args[0]) is None:
            return ERR_CHANNEL, _NO_ACTION
        return OK, Action(SUBSCRIBE if verb == b"SUB" else UNSUBSCRIBE, args[0])
    if verb == b"PING":
        return b"+PONG" + sep + rest + b"\n", _PING_ACTION
    if not line:
        return ERR_EMPTY, _NO_ACTION
    return ERR_UNKNOWN, _NO_ACTION


def _as_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def encode_message(channel: str | bytes, payload: str | bytes,
                   max_message: int | None = None) -> tuple[bytes, bytes]:
    """Validate and encode a message: returns ``(channel, b"MSG <channel> <payload>\\n")``.

    Raises ValueError for a bad channel, a payload containing a newline, or a line
    longer than ``max_message``; str values are encoded as UTF-8.
    """
    channel = _as_bytes(channel, "channel")
    payload = _as_bytes(payload, "payload")
    if _CHANNEL(channel) is None:
        raise ValueError(f"bad channel {channel!r}: 1-128 bytes of A-Z a-z 0-9 . _ : - expected")
    if b"\n" in payload:
        raise ValueError("a payload cannot contain a newline")
    line = b"MSG " + channel + b" " + payload + b"\n"
    if max_message is not None and len(line) > max_message:
        raise ValueError(f"message too long for one datagram ({len(line)} > {max_message} bytes)")
    return channel, line


def write_each(conns: Any, data: bytes, room: int) -> list[Any] | None:
    """The fan-out on any engine: ``conn.gather(data)`` for each connection of ``conns``
    whose unsent output is at most ``room``; returns the others (or None)."""
    slow = None
    for conn in conns:
        try:
            if conn.buffered > room:
                if slow is None:
                    slow = []
                slow.append(conn)
            else:
                conn.gather(data)  # one send per subscriber per loop turn, not per message
        except Exception:
            log.exception("push: delivery to a subscriber failed")
    return slow


class Hub:
    """The channels of one process and their subscribers (connections), and the fan-out.

    Thread-safe. :meth:`publish` encodes a message once and hands the same bytes
    object to every subscriber's ``conn.write()``; the subscriber set is copied
    under the lock (the copy is cached until subscriptions change) and written to
    outside it.

    Slow consumers: a subscriber whose unsent output (``conn.buffered``) would
    exceed ``max_buffer`` with this message gets the ``slow_consumer`` policy:
    ``disconnect`` (the default) unsubscribes it, writes ``-ERR slow consumer``
    if that still fits and closes it; ``drop`` discards this message for it
    (the newest are dropped; it keeps what is already queued). A subscriber
    with nothing pending always takes a message, however long. Both settings
    are read from ``server.config`` at each publish, so a reload applies them.

    Counters (``stats()``, and ``server.stats``): ``delivered`` (messages handed to
    a subscriber), ``dropped`` (messages dropped for slow subscribers),
    ``disconnected`` (slow subscribers closed).

    ``forward``, when set, is called with each message published in this process
    (not with those :meth:`deliver` gets from elsewhere): the relay uses it to
    reach the other processes of the server. ``bus``, when set (the node's
    :class:`~sockserv.bus.RedisBus`, in the process that holds it), gets them too
    (``bus.publish(line)``), for the other nodes; its counters join :meth:`stats`.
    """

    def __init__(self, server: Any = None) -> None:
        self.server = server
        self.forward: Callable[[bytes], None] | None = None
        self.bus: Any = None
        self._reset()

    def _reset(self) -> None:
        """Forget every subscription and count from zero, with a new lock (after fork:
        another thread of the parent may have held the old one)."""
        self._lock = threading.Lock()
        self._channels: dict[bytes, set[Any]] = {}
        self._snapshots: dict[bytes, tuple[Any, ...]] = {}
        self._subscriptions: dict[Any, set[bytes]] = {}
        self._delivered = self._dropped = self._disconnected = 0

    @property
    def max_message(self) -> int | None:
        """The longest MSG line this server can send: ``MAX_DATAGRAM`` over UDP, else None."""
        if getattr(self.server, "socket_type", None) == socket.SOCK_DGRAM:
            return MAX_DATAGRAM
        return None

    def _config(self) -> Config:
        config = getattr(self.server, "config", None)
        return config if config is not None else _DEFAULT_CONFIG

    # -- subscriptions ------------------------------------------------------------------

    def subscribe(self, channel: bytes, conn: Any) -> None:
        """Deliver ``channel``'s messages to ``conn`` from now on (idempotent)."""
        with self._lock:
            subscribers = self._channels.get(channel)
            if subscribers is None:
                subscribers = self._channels[channel] = set()
            elif conn in subscribers:
                return
            subscribers.add(conn)
            self._snapshots.pop(channel, None)
            channels = self._subscriptions.get(conn)
            if channels is None:
                channels = self._subscriptions[conn] = set()
            channels.add(channel)

    def unsubscribe(self, channel: bytes, conn: Any) -> bool:
        """Stop delivering ``channel`` to ``conn``; False if it was not subscribed."""
        with self._lock:
            channels = self._subscriptions.get(conn)
            if channels is None or channel not in channels:
                return False
            channels.discard(channel)
            if not channels:
                del self._subscriptions[conn]
            self._remove(channel, conn)
            return True

    def unsubscribe_all(self, conn: Any) -> bool:
        """Drop every subscription of ``conn`` (it is closing); False if it had none."""
        with self._lock:
            channels = self._subscriptions.pop(conn, None)
            if not channels:
                return False
            for channel in channels:
                self._remove(channel, conn)
            return True

    def _remove(self, channel: bytes, conn: Any) -> None:
        subscribers = self._channels[channel]
        subscribers.discard(conn)
        if not subscribers:
            del self._channels[channel]
        self._snapshots.pop(channel, None)

    def subscribers(self, channel: str | bytes) -> int:
        """How many connections of this process subscribe to ``channel``."""
        with self._lock:
            return len(self._channels.get(_as_bytes(channel, "channel"), ()))

    def subscriber_count(self) -> int:
        """How many connections of this process subscribe to at least one channel."""
        return len(self._subscriptions)

    def has_subscribers(self) -> bool:
        """Whether any connection of this process subscribes to anything."""
        return bool(self._channels)

    # -- publishing ---------------------------------------------------------------------

    def publish(self, channel: str | bytes, payload: str | bytes, *,
                cross_nodes: bool = True) -> int:
        """Publish ``MSG <channel> <payload>`` to every subscriber of the server.

        Safe from any thread. Validates and encodes once (ValueError for a bad
        channel, a newline in the payload, or, over UDP, a message too long for
        one datagram); hands it to the relay (other processes) if any, to the bus
        (other nodes) if any and ``cross_nodes``, then to this process's
        subscribers. Returns how many of those it was handed to.
        """
        channel, line = encode_message(channel, payload, self.max_message)
        if not cross_nodes:
            forward = self.forward
            if forward is not None:
                forward(line)
            return self.deliver(channel, line)
        return self.publish_line(channel, line)

    def publish_line(self, channel: bytes, line: bytes) -> int:
        """:meth:`publish` for a line already encoded and checked (``handle_line`` does)."""
        forward = self.forward
        if forward is not None:
            forward(line)
        bus = self.bus
        if bus is not None:
            bus.publish(line)
        return self.deliver(channel, line)

    def deliver(self, channel: bytes, line: bytes) -> int:
        """Hand ``line`` to this process's subscribers of ``channel`` only (no relay);
        returns how many took it. The hot path: one ``write`` per subscriber."""
        with self._lock:
            targets = self._snapshots.get(channel)
            if targets is None:
                subscribers = self._channels.get(channel)
                if not subscribers:
                    return 0
                targets = self._snapshots[channel] = tuple(subscribers)
        config = self._config()
        room = max(0, config.max_buffer - len(line))
        write_all = getattr(self.server, "write_all", None)  # the engine's own fan-out
        slow = (write_all or write_each)(targets, line, room)
        if slow is None:
            self._count(len(targets), 0, 0)
            return len(targets)
        dropped = disconnected = 0
        if config.slow_consumer == "drop":
            dropped = len(slow)
        else:
            for conn in slow:
                if self._disconnect(conn, config.max_buffer):
                    disconnected += 1
        delivered = len(targets) - len(slow)
        self._count(delivered, dropped, disconnected)
        return delivered

    def _disconnect(self, conn: Any, max_buffer: int) -> bool:
        if not self.unsubscribe_all(conn):
            return False  # another publisher got there first
        log.info("closing a slow consumer (%d bytes unsent)", conn.buffered)
        try:
            if conn.buffered + len(ERR_SLOW) <= max_buffer:
                conn.write(ERR_SLOW)
            conn.close()
        except Exception:
            log.exception("push: closing a slow consumer failed")
        return True

    def _count(self, delivered: int, dropped: int, disconnected: int) -> None:
        with self._lock:
            self._delivered += delivered
            self._dropped += dropped
            self._disconnected += disconnected
        stats = getattr(self.server, "stats", None)
        if stats is not None:
            stats.pushed(delivered, dropped, disconnected)

    def add_counts(self, delivered: int = 0, dropped: int = 0, disconnected: int = 0) -> None:
        """Add counts made elsewhere (e.g. a forked child's, reported through the relay)."""
        self._count(delivered, dropped, disconnected)

    def stats(self) -> dict[str, Any]:
        """``channels``, ``subscriptions``, ``delivered``, ``dropped``, ``disconnected``
        (this process, plus what the relay's children reported); with a bus, its
        ``bus`` state and ``bus_sent``, ``bus_received``, ``bus_lost`` too."""
        with self._lock:
            stats: dict[str, Any] = {
                "channels": len(self._channels),
                "subscriptions": sum(len(s) for s in self._channels.values()),
                "delivered": self._delivered,
                "dropped": self._dropped,
                "disconnected": self._disconnected,
            }
        bus = self.bus
        if bus is not None:
            stats.update(bus.stats())
        return stats


_DEFAULT_CONFIG = Config()


class PushHandler(LineHandler):
    """The push protocol on one TCP connection or UDP peer (see the module doc).

    Its subscriptions live in ``self.conn.server.hub`` and end with the connection
    (over UDP: when the peer expires after ``udp_idle`` seconds without a
    datagram, so a UDP subscriber keeps its lease by sending, e.g., ``PING``).

    ``uses_hub = True`` tells the fork engine to relay messages between its
    children; a handler of your own that publishes through ``server.hub`` or
    ``server.publish`` sets it too.
    """

    uses_hub = True

    def line_received(self, line: bytes) -> None:
        conn = self.conn
        reply, action = handle_line(line, MAX_DATAGRAM if conn.datagram else None)
        kind = action.kind
        if kind == PUBLISH:
            conn.server.hub.publish_line(action.channel, action.message)
        elif kind == SUBSCRIBE:
            conn.server.hub.subscribe(action.channel, conn)
        elif kind == UNSUBSCRIBE:
            conn.server.hub.unsubscribe(action.channel, conn)
        conn.write(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.conn.server.hub.unsubscribe_all(self.conn)


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds, e.g. ``2026-01-31T12:00:00.123Z``."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Ticker:
    """``tick = S``: publish ``MSG time <ISO-8601 UTC>`` to channel ``time`` every S seconds,
    from the serve loop's timers (``server.timers``), at a fixed rate without drift;
    ticks missed while the loop was busy are skipped, not bunched. Each node ticks
    for its own subscribers: ticks do not cross the bus."""

    channel = b"time"

    def __init__(self, server: Any, period: float) -> None:
        self.server = server
        self.period = period
        self._next = 0.0

    def start(self) -> None:
        """Schedule the first tick, ``period`` seconds from now."""
        self._next = time.monotonic() + self.period
        self.server.timers.call_at(self._next, self._tick)

    def _tick(self) -> None:
        try:
            self.server.hub.publish(self.channel, utc_now(), cross_nodes=False)
        except Exception:
            log.exception("tick: publishing failed")
        now = time.monotonic()
        self._next += self.period
        if self._next <= now:
            self._next = now + self.period
        self.server.timers.call_at(self._next, self._tick)
