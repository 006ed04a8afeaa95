"""Push messages between the processes of one server: a parent (the fork engine's
server, or a supervisor of workers) and its children, over one socketpair each.

Each child's :class:`~sockserv.Hub` hands what it publishes to its :class:`Uplink`
(``hub.forward``); the parent's :class:`Relay` reads it and writes it on to every
*other* child, whose uplink delivers it to that child's own subscribers. The parent
does not track who subscribes to what: a child that acknowledged ``SUB`` with
``+OK`` must get every message published after that, and a subscription that first
had to travel to the parent would race with a ``PUB`` arriving there from another
child. Fanning out to every child costs one ``write`` per child per batch of
messages, and a child without subscribers to a channel drops its messages after
one dict lookup.

Wire format, both ways, on ``SOCK_STREAM`` Unix socketpairs: lines. A message is
exactly the line subscribers get, ``MSG <channel> <payload>\\n``, so it is encoded
once per process: the parent forwards the bytes it read, in whole lines, without
splitting them. A child also sends ``STATS <delivered> <dropped> <disconnected>\\n``
(counter increments since its last report) before it exits; the parent adds them
to its own counters and forwards nothing.

Order: a publisher's messages go through one child-to-parent stream and one
parent-to-child stream per receiver, each read and written in order, so every
subscriber gets them in publish order.

Flow control: a child writes to the parent with blocking ``sendall`` (a publisher
waits while the parent is behind: back-pressure). The parent never blocks: it
writes with ``MSG_DONTWAIT`` and queues the rest (sent by the process's flusher
thread); a child more than ``max_backlog`` bytes behind loses further messages,
counted as dropped, until it catches up.

Across nodes (``bus``): the parent holds the node's :class:`~sockserv.bus.RedisBus`
(``hub.bus``). What a child sends up also goes to the bus; what the bus brings from
other nodes goes to every child (:meth:`Relay.deliver_remote`), never back to the
bus. Children never hold the bus.

Use (the fork engine does this; a supervisor of workers the same)::

    relay = Relay(hub, loop)     # parent, before the first fork; loop has
                                 # watch(fd, callback) and unwatch(fd)
    pid = os.fork()
    if pid:                      # parent
        relay.adopt(pid)         # the spare socketpair becomes this child's link
        ...
        relay.detach(pid)        # when the child has exited (reads what it left)
    else:                        # child
        relay.become_child()     # closes the parent's ends; starts the uplink thread
        ...
        relay.child_exit()       # reports the child's counters
    relay.close()                # parent, at server close

A worker whose server is built after the fork, on an event loop, connects that
server's hub and lets its loop read the uplink::

    uplink = relay.become_child(hub=server.hub, loop=server)

The relay parts run on the parent's loop thread (``forward`` is safe from any
thread). The child's ``Uplink.send`` blocks while the parent is behind: on an
event loop that pauses the loop (back-pressure on every publisher of the
process).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from .background import start_thread
from .engines.blocking import StreamConnection
from .handlers import Handler
from .push import Hub

__all__ = ["Relay", "Uplink", "deliver_frames"]

log = logging.getLogger("sockserv")

RECV_SIZE = 262144


def deliver_frames(hub: Hub, frames: bytes) -> None:
    """Hand whole relay lines (``frames`` ends in ``\\n``) to ``hub``: each ``MSG`` line
    to the local subscribers of its channel, each ``STATS`` line to the counters."""
    if not hub.has_subscribers() and b"STATS " not in frames:
        return
    deliver = hub.deliver
    start, end = 0, len(frames)
    while start < end:
        stop = frames.index(b"\n", start) + 1
        if frames.startswith(b"MSG ", start):
            space = frames.find(b" ", start + 4, stop)
            if space > start + 4:
                deliver(frames[start + 4:space], frames[start:stop])
        elif frames.startswith(b"STATS ", start):
            try:
                delivered, dropped, disconnected = map(int, frames[start + 6:stop].split())
            except ValueError:
                pass
            else:
                hub.add_counts(delivered, dropped, disconnected)
        start = stop


def _whole_lines(partial: bytes, data: bytes) -> tuple[bytes, bytes]:
    """(the complete lines of ``partial + data``, the unterminated rest)."""
    if partial:
        data = partial + data
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return data, b""
    return data[:end], data[end:]


class _Link:
    """The parent's end of one child's socketpair."""

    __slots__ = ("key", "sock", "fd", "out", "partial", "lagging")

    def __init__(self, key: Any, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.out = StreamConnection(None, Handler, sock, f"relay:{key}")  # non-blocking writes
        self.partial = b""
        self.lagging = False


class Relay:
    """The parent's side: one link per child; each message from a child (or published
    in the parent) goes to every other child. See the module doc.

    ``loop`` provides ``watch(fd, callback)`` and ``unwatch(fd)`` (every sockserv
    server does); the relay's callbacks run in that loop. ``forward`` (installed as
    ``hub.forward``) may be called from any thread.
    """

    max_backlog = 8 << 20  #: bytes queued for one child before its messages are dropped

    def __init__(self, hub: Hub, loop: Any) -> None:
        self.hub = hub
        self.loop = loop
        self.uplink: Uplink | None = None
        self._links: dict[Any, _Link] = {}
        self._lock = threading.Lock()
        self._spare: tuple[socket.socket, socket.socket] | None = None
        self._spare = self._new_pair()
        hub.forward = self.forward

    @staticmethod
    def _new_pair() -> tuple[socket.socket, socket.socket] | None:
        try:
            return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            log.error("relay: cannot make a socketpair (%s): the next child publishes "
                      "and receives only locally", exc.strerror or exc)
            return None

    # -- parent -------------------------------------------------------------------------

    def adopt(self, key: Any) -> None:
        """In the parent, right after forking child ``key``: its link is the spare pair
        (inherited by the child), which is replaced for the next child."""
        spare, self._spare = self._spare, self._new_pair()
        if spare is None:
            return
        parent_end, child_end = spare
        child_end.close()
        link = _Link(key, parent_end)
        with self._lock:
            self._links[key] = link
        self.loop.watch(link.fd, lambda: self._readable(link))

    def detach(self, key: Any) -> None:
        """In the parent, once child ``key`` has exited: relay what it sent last, then
        close its link (idempotent)."""
        link = self._links.get(key)
        if link is None:
            return
        while True:
            try:
                data = link.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: nothing more; others: gone
                break
            if not data:
                break
            self._received(link, data)
        self._drop(link)

    def forward(self, line: bytes) -> None:
        """Send whole lines (a message published in this process) to every child."""
        self._send(line, None)

    def _readable(self, link: _Link) -> None:
        try:
            data = link.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._received(link, data)
        else:
            self._drop(link)  # the child has closed its end: it is exiting

    def _received(self, link: _Link, data: bytes) -> None:
        frames, link.partial = _whole_lines(link.partial, data)
        if not frames:
            return
        if frames.startswith(b"STATS ") or b"\nSTATS " in frames:  # a child's last words
            deliver_frames(self.hub, frames)
            frames = b"".join(line + b"\n" for line in frames.split(b"\n")[:-1]
                              if line.startswith(b"MSG "))
            if not frames:
                return
        elif self.hub.has_subscribers():
            deliver_frames(self.hub, frames)
        self._send(frames, link)
        bus = self.hub.bus
        if bus is not None:
            bus.publish(frames)  # and to the other nodes

    def deliver_remote(self, frames: bytes) -> None:
        """Whole ``MSG`` lines from the other nodes (the bus), in the parent's loop: to
        the parent's own subscribers and every child; not back to the bus."""
        if self.hub.has_subscribers():
            deliver_frames(self.hub, frames)
        self._send(frames, None)

    def _send(self, frames: bytes, exclude: _Link | None) -> None:
        with self._lock:
            links = tuple(self._links.values())
        limit = self.max_backlog
        for link in links:
            if link is exclude:
                continue
            out = link.out
            if out.buffered > limit:
                self.hub.add_counts(dropped=frames.count(b"\n"))
                if not link.lagging:
                    link.lagging = True
                    log.warning("relay: child %s is more than %d bytes behind; dropping "
                                "its messages until it catches up", link.key, limit)
                continue
            link.lagging = False
            out.write(frames)

    def _drop(self, link: _Link) -> None:
        with self._lock:
            if self._links.get(link.key) is not link:
                return
            del self._links[link.key]
        try:
            self.loop.unwatch(link.fd)
        except (KeyError, ValueError, OSError):
            pass
        link.out.abort()
        link.out.drain(0)  # takes it off the flusher before the socket goes
        link.sock.close()

    def close(self) -> None:
        """In the parent, at server close: close every link and the spare pair."""
        for link in list(self._links.values()):
            self._drop(link)
        if self._spare is not None:
            for sock in self._spare:
                sock.close()
            self._spare = None

    # -- child --------------------------------------------------------------------------

    def become_child(self, hub: Hub | None = None, loop: Any = None) -> Uplink | None:
        """In a new child (still single-threaded): close the parent's ends (this
        child's and its siblings'), and connect ``hub`` (default: the relay's own,
        inherited and emptied here) to the parent through an :class:`Uplink`. The
        uplink is read by a thread of its own, or by ``loop`` (``watch``/``unwatch``,
        e.g. the child's own server) if given. Returns the uplink (None if the pair
        was missing: the child then publishes locally only)."""
        for link in self._links.values():
            link.sock.close()  # only the descriptor: the parent's locks are not touched
        self._links = {}
        self._lock = threading.Lock()
        spare, self._spare = self._spare, None
        if hub is None:
            hub = self.hub
            hub._reset()
        self.hub.forward = None
        self.hub.bus = None  # the parent speaks for the node
        if spare is None:
            return None
        parent_end, child_end = spare
        parent_end.close()
        self.uplink = Uplink(child_end, hub)
        hub.forward = self.uplink.send
        if loop is not None:
            self.uplink.attach(loop)
        else:
            self.uplink.start()
        return self.uplink

    def child_exit(self) -> None:
        """In a child about to exit: report its counters to the parent."""
        if self.uplink is not None:
            self.uplink.report_stats(block=False)


class Uplink:
    """A child's end of its socketpair to the parent: ``send`` what this process
    publishes (``hub.forward``), deliver what the parent relays to the local hub."""

    def __init__(self, sock: socket.socket, hub: Hub) -> None:
        self.sock = sock
        self.hub = hub
        self._lock = threading.Lock()
        self._partial = b""
        self._broken = False
        self._reported = (0, 0, 0)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, line: bytes) -> None:
        """Send whole lines to the parent; blocks while the parent is behind. Thread-safe."""
        with self._lock:
            if self._broken:
                return
            try:
                self.sock.sendall(line)
            except OSError as exc:
                self._broken = True
                log.warning("relay: the parent process is gone (%s); publishing locally only",
                            exc.strerror or exc)

    def start(self) -> threading.Thread:
        """Read the parent's messages in a daemon thread until the parent goes away."""
        return start_thread(self._run, "sockserv-uplink")

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            self._received(data)

    def attach(self, loop: Any) -> None:
        """Have ``loop`` (``watch(fd, callback)``, ``unwatch(fd)``) read the parent's
        messages, instead of a thread: on an event loop, delivery then runs on the
        loop's own thread."""
        fd = self.fileno()

        def on_readable() -> None:
            if not self.readable():
                loop.unwatch(fd)

        loop.watch(fd, on_readable)

    def readable(self) -> bool:
        """For an event loop: deliver what the parent sent; False once it is gone."""
        try:
            data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self._received(data)
        return True

    def _received(self, data: bytes) -> None:
        frames, self._partial = _whole_lines(self._partial, data)
        if frames:
            deliver_frames(self.hub, frames)

    def report_stats(self, block: bool = True) -> None:
        """Send the hub's counter increments since the last report to the parent.
        With ``block`` False (at exit) the report is skipped if it cannot go at once."""
        stats = self.hub.stats()
        counts = (stats["delivered"], stats["dropped"], stats["disconnected"])
        delta = tuple(now - before for now, before in zip(counts, self._reported, strict=True))
        if not any(delta):
            return
        line = b"STATS %d %d %d\n" % delta
        if not self._lock.acquire(timeout=None if block else 1.0):
            return
        try:
            if self._broken:
                return
            if block:
                self.sock.sendall(line)
            else:
                self.sock.send(line, socket.MSG_DONTWAIT)
            self._reported = counts
        except OSError:
            pass
        finally:
            self._lock.release()
