"""The push bus: fan-out across nodes (sockserv servers on other machines) through
Redis pub/sub, the way socket.io's Redis adapter does it.

``bus = "redis://[USER:PASSWORD@]HOST[:PORT][/DB]"`` (``rediss://`` for TLS) gives
each node one :class:`RedisBus`, living where the node's fan-out lives: the single
server process (``workers = 1``, select or thread engine), the fork engine's parent
(next to its :class:`~sockserv.relay.Relay`), or the supervisor of workers (next to
its relay). Forked children and workers never touch it: they reach the parent
through the relay, and the parent speaks for the node.

Why no Redis client library: redis-py's clients are blocking (or need an asyncio
loop, which our engines do not run), so driving one from our loops would need the
same two threads as here anyway, plus a runtime dependency in the fork engine's
parent, which forks per connection while such threads may hold the client's locks;
and the core imports nothing but the standard library. The bus needs four commands
(AUTH, SELECT, PUBLISH, SUBSCRIBE) and the replies to them: a few lines of RESP2
(:mod:`sockserv.resp`) on two blocking sockets.

How it works:

- Two daemon threads, two connections. The *session* thread connects both (TCP,
  TLS for ``rediss``, ``AUTH``, ``SELECT`` for ``/DB``), ``SUBSCRIBE``\\ s to the
  node's channel and reads messages; the *publisher* thread sends what the node
  publishes, in batches: every message queued meanwhile, pipelined ``PUBLISH``
  commands of up to 256 KiB each, then their replies (and a ``PING`` after 15 s
  idle, which finds a dead connection before a message is lost on it). The serve
  loop never waits for Redis: :meth:`RedisBus.publish` appends to a queue, and
  messages from Redis reach the loop through ``loop.call_soon_threadsafe`` (with
  more than 16 MiB of them waiting for the loop, the session thread stops reading
  and lets Redis buffer, up to its ``client-output-buffer-limit``).
- Encoding: one ``PUBLISH`` carries ``<node-id> `` followed by whole
  ``MSG <channel> <payload>\\n`` lines, the bytes subscribers get (and the relay
  carries), encoded once. The node id is random per node start; a node drops the
  messages carrying its own id (it delivered them locally already), so no
  subscriber gets a message twice. A message from Redis that is not made of whole
  ``MSG`` lines is ignored (and logged, at most once a second).
- The Redis channel is ``sockserv:<DB>`` (``sockserv:0`` without ``/DB``). Redis
  pub/sub ignores the database number, so it is the channel name that keeps two
  clusters sharing one Redis apart: give each its own ``/DB``.
- Failure: while Redis cannot be reached the node serves its own subscribers; the
  session thread retries after 0.1 s, doubling up to 5 s. One line is logged when
  the bus goes down (at start, or lost mid-run) and one when it is up again.
  Messages published while the bus is down, or on their way when it went down, or
  beyond 8 MiB waiting for a slow Redis, do not cross nodes: they are counted
  (``bus_lost``), never queued for later. Either connection failing ends both and
  starts a new session.

Delivery guarantee: at most once across nodes (a message is never delivered twice;
one published while the bus is down, or in flight when it fails, reaches the
publisher's node only); order is kept per publisher within a node, and across nodes
while the bus connection stays up (one queue, one connection, one subscriber
connection per node, each in order).

Counters (:meth:`RedisBus.stats`, merged into ``server.stats`` and
``server.hub.stats()``): ``bus`` (``off``, ``up``, ``down``), ``bus_sent``
(messages handed to Redis), ``bus_received`` (messages from other nodes),
``bus_lost``.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple

from .background import start_thread
from .log import RateLimitedLog
from .resp import Parser, ProtocolError, ReplyError, encode_command

__all__ = ["BusURL", "RedisBus", "parse_url"]

log = logging.getLogger("sockserv")

DEFAULT_PORT = 6379
RECV_SIZE = 262144

# Session states (RedisBus._link)
CONNECTING = "connecting"  # the first attempt: messages wait for it
UP = "up"
DOWN = "down"


class BusURL(NamedTuple):
    """A parsed ``redis://`` or ``rediss://`` URL."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = None

    def display(self) -> str:
        """The URL without its credentials, for log lines."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def _redacted(value: str) -> str:
    """``value`` with whatever sits between ``://`` and ``@`` hidden."""
    scheme, sep, rest = value.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return value


def parse_url(value: str) -> BusURL:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` for TLS) -> BusURL.

    The port defaults to 6379, the database to 0; user and password are
    percent-decoded. Raises ValueError with a one-line reason (the password hidden).
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    shown = repr(_redacted(value))
    try:
        parts = urllib.parse.urlsplit(value.strip())
    except ValueError as exc:
        raise ValueError(f"{shown} is not a URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{shown} is not a redis:// or rediss:// URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown}: query strings and fragments are not supported")
    host = parts.hostname
    if not host:
        raise ValueError(f"{shown} names no host (redis://HOST[:PORT][/DB])")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown} has a bad port (1-65535 expected)") from None
    if port is None:
        port = DEFAULT_PORT
    elif not 1 <= port <= 65535:
        raise ValueError(f"{shown} has a bad port (1-65535 expected)")
    path = parts.path.strip("/")
    if not path:
        db = 0
    elif path.isdigit() and len(path) <= 9:
        db = int(path)
    else:
        raise ValueError(f"{shown} has a bad database number (/DB: 0 or more expected)")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return BusURL(parts.scheme == "rediss", host, port, db, username, password)


def _whole_msg_lines(frames: bytes) -> bool:
    """Whether ``frames`` is one or more whole ``MSG ...\\n`` lines (and nothing else)."""
    return (frames.startswith(b"MSG ") and frames.endswith(b"\n")
            and frames.count(b"\n") == frames.count(b"\nMSG ") + 1)


class _Closing(Exception):
    """The bus is closing (internal)."""


class RedisBus:
    """One node's connection to the other nodes through Redis pub/sub (see the module doc).

    ``loop`` has ``call_soon_threadsafe(fn, *args)`` (every sockserv server and the
    supervisor do); ``deliver(frames)`` is called there with whole ``MSG`` lines from
    the other nodes, to hand to this node's subscribers (and not back to the bus).
    ``password`` (the ``bus_password`` setting) wins over one in the URL.

    :meth:`start` starts the two threads; :meth:`publish` (any thread) queues whole
    lines for the other nodes; :meth:`close` stops; :meth:`forget` in a forked child
    lets go of the parent's sockets. ``on_state(state)``, when set, is called in the
    loop when :attr:`state` changes.
    """

    batch_size = 256 << 10  #: bytes of MSG lines per PUBLISH (one line may exceed it)
    backlog_limit = 8 << 20  #: bytes waiting for Redis before further messages are lost
    connect_timeout = 5.0  #: connecting, TLS handshake, AUTH/SELECT/SUBSCRIBE replies
    reply_timeout = 10.0  #: a PUBLISH reply (or sending a batch) taking longer ends the session
    min_delay = 0.1  #: the first retry's delay; it doubles ...
    max_delay = 5.0  #: ... up to this
    close_timeout = 1.0  #: what close() waits for each thread
    ping_interval = 15.0  #: an idle publisher connection sends PING this often
    inbound_limit = 16 << 20  #: bytes from Redis waiting for the loop before reading pauses

    def __init__(self, url: str | BusURL, loop: Any, deliver: Callable[[bytes], Any], *,
                 password: str | None = None, node_id: str | None = None) -> None:
        self.url = parse_url(url) if isinstance(url, str) else url
        if password:
            self.url = self.url._replace(password=password)
        self.channel = b"sockserv:%d" % self.url.db
        self.node_id = node_id or secrets.token_hex(8)
        self._prefix = self.node_id.encode() + b" "
        self.loop = loop
        self.deliver = deliver
        self.on_state: Callable[[str], Any] | None = None
        self.sent = self.received = self.lost = 0
        self._cond = threading.Condition()
        self._queue: list[bytes] = []
        self._queued_bytes = self._queued_msgs = self._in_flight = 0
        self._link = CONNECTING
        self._generation = 0
        self._socks: list[socket.socket] = []  # the session's sockets, and those opening
        self._pub_sock: socket.socket | None = None
        self._pub_parser = Parser()
        self._lost_before = 0  # bus_lost when the bus last went down
        self._started = self._closing = False
        self._loop_lock = threading.Lock()
        self._loop_open = True
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ssl_context: Any = None
        self._malformed_log = RateLimitedLog(log)
        self._inbound = 0  # bytes handed to the loop, not yet delivered
        self._inbound_cond = threading.Condition()
        self._backlog_log = RateLimitedLog(log, interval=10.0)

    @classmethod
    def from_config(cls, config: Any, loop: Any, deliver: Callable[[bytes], Any]) -> RedisBus:
        """The bus of ``config.bus`` (with ``config.bus_password``)."""
        return cls(config.bus, loop, deliver, password=config.bus_password)

    # -- what the node sees ------------------------------------------------------------

    @property
    def state(self) -> str:
        """``up`` (both connections ready), ``down`` (connecting or retrying), or
        ``off`` (not started, or closed)."""
        if not self._started or self._closing:
            return "off"
        return UP if self._link == UP else DOWN

    def stats(self) -> dict[str, Any]:
        """``bus`` (the state), ``bus_sent``, ``bus_received``, ``bus_lost``."""
        return {"bus": self.state, "bus_sent": self.sent, "bus_received": self.received,
                "bus_lost": self.lost}

    def describe(self) -> str:
        """For STATUS: ``bus up``, ``bus down (12 lost)``."""
        lost = self.lost
        return f"bus {self.state}" + (f" ({lost} lost)" if lost else "")

    def start(self) -> None:
        """Start the session and publisher threads (once)."""
        if self._started:
            return
        self._started = True
        for target, name in ((self._run_session, "sockserv-bus"),
                             (self._run_publisher, "sockserv-bus-publish")):
            self._threads.append(start_thread(target, name))

    def publish(self, frames: bytes) -> None:
        """Queue whole ``MSG`` lines for the other nodes. Never blocks on Redis; safe
        from any thread. While the bus is down they are counted lost instead."""
        with self._cond:
            if self._link == DOWN or self._closing:
                self.lost += frames.count(b"\n")
                return
            if self._queued_bytes > self.backlog_limit:
                self.lost += frames.count(b"\n")
                self._backlog_log.log(logging.WARNING, "bus: more than %d bytes wait for %s; "
                                      "messages published now reach this node only",
                                      self.backlog_limit, self.url.display())
                return
            self._queue.append(frames)
            self._queued_bytes += len(frames)
            self._queued_msgs += frames.count(b"\n")
            if len(self._queue) == 1:
                self._cond.notify_all()

    def close(self) -> None:
        """Stop: send what is queued (for up to ``close_timeout``), close both
        connections, end the threads. Idempotent; ``on_state`` and ``deliver`` are
        not called once this returns."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._wake.set()
        with self._inbound_cond:
            self._inbound_cond.notify_all()
        for thread in self._threads[1:]:  # the publisher flushes the queue first
            thread.join(self.close_timeout)
        with self._cond:
            socks, self._socks, self._pub_sock = self._socks, [], None
            self.lost += self._queued_msgs  # what could not be sent in time
            self._queue, self._queued_bytes, self._queued_msgs = [], 0, 0
        for sock in socks:
            _shut(sock)
        for thread in self._threads[:1]:
            thread.join(self.close_timeout)
        with self._loop_lock:
            self._loop_open = False

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's sockets (the
        parent's connections stay up) and never use the bus. Takes no lock: a thread
        of the parent may have held one at the fork."""
        self._closing = True
        self._loop_open = False
        for sock in list(self._socks):
            try:
                sock.close()
            except OSError:
                pass
        self._socks = []
        self._pub_sock = None
        self._threads = []

    # -- in the threads ---------------------------------------------------------------

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._loop_lock:
            if self._loop_open:
                self.loop.call_soon_threadsafe(fn, *args)

    def _state_changed(self) -> None:
        """In the loop: tell ``on_state``."""
        callback = self.on_state
        if callback is not None:
            try:
                callback(self.state)
            except Exception:
                log.exception("bus: the state callback failed")

    def _run_session(self) -> None:
        delay = 0.0
        while not self._closing:
            try:
                generation, sub, parser, replies = self._open()
            except _Closing:
                return
            except Exception as exc:
                self._failed(exc, None)
            else:
                started = time.monotonic()
                try:
                    self._read(sub, parser, replies)
                except _Closing:
                    return
                except Exception as exc:
                    self._failed(exc, generation)
                if time.monotonic() - started > 1.0:
                    delay = 0.0  # a session that lasted: retry at once, then back off
            if self._closing:
                return
            self._wake.wait(delay)
            delay = min(self.max_delay, max(self.min_delay, delay * 2))

    def _socket(self) -> socket.socket:
        """A new TCP (TLS) connection to Redis, registered so that close() can end it."""
        url = self.url
        infos = socket.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            with self._cond:
                if self._closing:
                    sock.close()
                    raise _Closing
                self._socks.append(sock)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(address)
                break
            except OSError as exc:
                error = exc
                self._discard(sock)
        else:
            raise error or OSError(f"cannot resolve {url.host}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        if url.tls:
            if self._ssl_context is None:
                import ssl

                self._ssl_context = ssl.create_default_context()
            plain = sock
            try:
                sock = self._ssl_context.wrap_socket(plain, server_hostname=url.host)
            except BaseException:
                self._discard(plain)
                raise
            with self._cond:
                self._socks = [sock if s is plain else s for s in self._socks]
        return sock

    def _discard(self, sock: socket.socket) -> None:
        with self._cond:
            if sock in self._socks:
                self._socks.remove(sock)
        sock.close()

    def _handshake(self, sock: socket.socket, *command: bytes | str) -> tuple[Parser, list[Any]]:
        """AUTH, SELECT, then ``command``, pipelined; returns the connection's parser
        and the replies from ``command``'s on (with whatever came after it). Raises
        the first error reply."""
        url = self.url
        commands = []
        if url.password is not None:
            commands.append(encode_command("AUTH", *filter(None, (url.username, url.password))))
        if url.db:
            commands.append(encode_command("SELECT", url.db))
        commands.append(encode_command(*command))
        parser = Parser()
        replies = _exchange(sock, parser, commands)
        for reply in replies[:len(commands)]:
            if isinstance(reply, ReplyError):
                raise reply
        return parser, replies[len(commands) - 1:]

    def _open(self) -> tuple[int, socket.socket, Parser, list[Any]]:
        """Connect both connections; the session is up. Returns (generation, the
        subscriber socket, its parser, replies that came after SUBSCRIBE's)."""
        try:
            pub = self._socket()
            pub_parser, _ = self._handshake(pub, "PING")
            sub = self._socket()
            parser, replies = self._handshake(sub, "SUBSCRIBE", self.channel)
        except BaseException:
            with self._cond:
                socks, self._socks = self._socks, []
            for sock in socks:
                sock.close()
            raise
        first = replies[0]
        if not (isinstance(first, list) and first[:2] == [b"subscribe", self.channel]):
            raise ProtocolError(f"unexpected reply to SUBSCRIBE: {first!r:.80}")
        pub.settimeout(self.reply_timeout)
        sub.settimeout(None)  # keepalive finds a dead peer; close() shuts it down
        with self._cond:
            if self._closing:
                raise _Closing
            was = self._link
            self._link = UP
            self._generation += 1
            generation = self._generation
            self._pub_sock, self._pub_parser = pub, pub_parser
            self._cond.notify_all()
            lost = self.lost - self._lost_before
        if was == DOWN:
            log.warning("bus: connected again to %s; %d message(s) published meanwhile "
                        "reached this node only", self.url.display(), lost)
        else:
            log.info("bus: connected to %s (channel %s, node %s)", self.url.display(),
                     self.channel.decode(), self.node_id)
        self._to_loop(self._state_changed)
        return generation, sub, parser, replies[1:]

    def _read(self, sub: socket.socket, parser: Parser, replies: list[Any]) -> None:
        while True:
            if replies:
                self._received(replies)
            data = sub.recv(RECV_SIZE)
            if not data:
                if self._closing:
                    raise _Closing
                raise ConnectionError("Redis closed the connection")
            replies = parser.feed(data)

    def _received(self, replies: list[Any]) -> None:
        prefix = self._prefix
        chunks = []
        count = 0
        for reply in replies:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                data = reply[2]
                if not isinstance(data, bytes) or data.startswith(prefix):
                    continue  # our own: delivered here when it was published
                space = data.find(b" ")
                frames = data[space + 1:]
                if space <= 0 or not _whole_msg_lines(frames):
                    self._malformed_log.log(logging.WARNING, "bus: ignoring a message on %s "
                                            "that is not <node> MSG lines: %r",
                                            self.channel.decode(), data[:80])
                    continue
                chunks.append(frames)
                count += frames.count(b"\n")
            elif isinstance(reply, ReplyError):
                raise reply
        if chunks:
            self.received += count
            frames = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            with self._inbound_cond:  # a loop far behind: stop reading (Redis buffers)
                while self._inbound > self.inbound_limit and not self._closing:
                    self._inbound_cond.wait(1.0)
                self._inbound += len(frames)
            self._to_loop(self._deliver, frames)

    def _deliver(self, frames: bytes) -> None:
        """In the loop: hand messages from the other nodes to this node."""
        try:
            self.deliver(frames)
        except Exception:
            log.exception("bus: delivering messages from other nodes failed")
        finally:
            with self._inbound_cond:
                self._inbound -= len(frames)
                self._inbound_cond.notify_all()

    def _failed(self, exc: BaseException, generation: int | None) -> None:
        """A connection attempt (``generation`` None) or session ``generation`` failed:
        the bus is down; log it once, drop what waits, end the other connection."""
        reason = _reason(exc)
        with self._cond:
            if self._closing:
                return
            if generation is not None and generation != self._generation:
                return  # the other thread got there first
            was = self._link
            lost = self._queued_msgs + self._in_flight
            if was != DOWN:
                self._lost_before = self.lost
            self.lost += lost
            self._queue, self._queued_bytes, self._queued_msgs = [], 0, 0
            self._in_flight = 0
            self._link = DOWN
            self._generation += 1
            socks, self._socks, self._pub_sock = self._socks, [], None
            self._cond.notify_all()
        for sock in socks:
            _shut(sock)
        if was == UP:
            log.warning("bus: lost %s (%s); until it is back, messages reach this node's "
                        "subscribers only (%d not sent); retrying", self.url.display(), reason,
                        lost)
        elif was == CONNECTING:
            log.warning("bus: cannot use %s (%s); serving this node's subscribers only and "
                        "retrying", self.url.display(), reason)
        if was != DOWN:
            self._to_loop(self._state_changed)

    def _run_publisher(self) -> None:
        cond = self._cond
        last = time.monotonic()
        while True:
            batch: list[bytes] = []  # empty: an idle PING (finds a dead connection, and
            count = 0  # keeps a Redis with an idle `timeout` from closing it)
            with cond:
                while not (self._queue and self._link == UP) and not self._closing:
                    idle = time.monotonic() - last
                    if self._link == UP and idle >= self.ping_interval:
                        break
                    cond.wait(self.ping_interval - idle if self._link == UP else None)
                else:
                    if not (self._queue and self._link == UP):
                        return  # closing, nothing (more) to send
                    batch, self._queue = self._queue, []
                    count = self._in_flight = self._queued_msgs
                    self._queued_bytes = self._queued_msgs = 0
                sock, parser, generation = self._pub_sock, self._pub_parser, self._generation
            try:
                if sock is None:
                    raise ConnectionError("no connection")
                if batch:
                    self._send(sock, parser, batch)
                else:
                    reply = _exchange(sock, parser, [encode_command("PING")])[0]
                    if reply != "PONG":
                        raise reply if isinstance(reply, ReplyError) else \
                            ProtocolError(f"unexpected reply to PING: {reply!r:.80}")
            except Exception as exc:
                self._failed(exc, generation)
            else:
                if count:
                    with cond:
                        if self._generation == generation:
                            self._in_flight = 0
                            self.sent += count
            last = time.monotonic()

    def _send(self, sock: socket.socket, parser: Parser, batch: list[bytes]) -> None:
        """PUBLISH ``batch`` (lists of whole lines) in commands of about ``batch_size``
        bytes, pipelined, then read every reply."""
        commands = []
        chunk: list[bytes] = [self._prefix]
        size = 0
        limit = self.batch_size
        publish, channel = b"PUBLISH", self.channel
        for frames in batch:
            if size and size + len(frames) > limit:
                commands.append(encode_command(publish, channel, b"".join(chunk)))
                chunk, size = [self._prefix], 0
            chunk.append(frames)
            size += len(frames)
        commands.append(encode_command(publish, channel, b"".join(chunk)))
        for reply in _exchange(sock, parser, commands):
            if not isinstance(reply, int):
                raise reply if isinstance(reply, ReplyError) else \
                    ProtocolError(f"unexpected reply to PUBLISH: {reply!r:.80}")


def _exchange(sock: socket.socket, parser: Parser, commands: list[bytes]) -> list[Any]:
    """Send ``commands`` pipelined, then read until there is a reply to each; returns
    the replies (and any that came after them)."""
    sock.sendall(b"".join(commands) if len(commands) > 1 else commands[0])
    replies: list[Any] = []
    while len(replies) < len(commands):
        data = sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionError("Redis closed the connection")
        replies += parser.feed(data)
    return replies


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ReplyError):
        return f"Redis said: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__


def _shut(sock: socket.socket) -> None:
    """End a connection for every thread and process that holds it, then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
