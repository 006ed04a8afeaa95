"""Driving a sockserv Handler over a blocking socket, for the thread and fork engines.

The reading side is plain blocking ``recv`` in the connection's own thread (or
child process). Writes never block: ``write`` sends what the kernel takes at
once (``MSG_DONTWAIT``) and leaves the rest to the process's one
:class:`Flusher` thread, which sends it when the socket is writable.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ..background import start_thread
from ..connection import Connection, format_address
from ..handlers import EchoHandler

__all__ = ["Flusher", "StreamConnection", "serve_stream"]

log = logging.getLogger("sockserv")
RECV_SIZE = 65536
# A plain connection reads at most SMALL_RECV bytes at a time while its reads come in
# under that, and RECV_SIZE once one reaches it. A bytes object that small comes from
# CPython's allocator for objects of up to 512 bytes; a 64 KiB read costs a malloc, a
# realloc and a free per read (8 % of a thread's echo). A small read that fills up is
# topped up at once (read_rest), so what is there arrives in one piece, never split
# at 479 bytes (a split echo can wait 40 ms on Nagle and the peer's delayed ACK).
SMALL_RECV = 479
_DONTWAIT = socket.MSG_DONTWAIT


class Flusher:
    """One thread per process sending the output that connections could not send at once."""

    _instance: Flusher | None = None
    _instance_pid = 0
    _create_lock = threading.Lock()

    @classmethod
    def _forget_after_fork(cls) -> None:
        # A fork child has none of the parent's threads: not its flusher, and not the
        # owner of the creation lock if another thread held it at the fork.
        cls._instance, cls._create_lock = None, threading.Lock()

    @classmethod
    def get(cls) -> Flusher:
        """The flusher of this process (a forked child gets its own)."""
        with cls._create_lock:
            if cls._instance is None or cls._instance_pid != os.getpid():
                cls._instance, cls._instance_pid = cls(), os.getpid()
            return cls._instance

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._commands: collections.deque[tuple[str, StreamConnection, threading.Event | None]]
        self._commands = collections.deque()
        start_thread(self._run, "sockserv-flusher")

    def watch(self, conn: StreamConnection) -> None:
        """Send ``conn``'s pending output when its socket turns writable."""
        self._commands.append(("watch", conn, None))
        os.write(self._wake_w, b"!")

    def forget(self, conn: StreamConnection) -> None:
        """Stop watching ``conn``; returns once its socket is no longer registered."""
        done = threading.Event()
        self._commands.append(("forget", conn, done))
        os.write(self._wake_w, b"!")
        done.wait()

    def _run(self) -> None:
        selector = self._selector
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    self._run_commands()
                elif key.data.flush():
                    selector.unregister(key.fileobj)

    def _run_commands(self) -> None:
        while self._commands:
            command, conn, done = self._commands.popleft()
            registered = conn.sock in self._selector.get_map()
            if command == "watch" and not registered:
                self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            elif command == "forget":
                if registered:
                    self._selector.unregister(conn.sock)
                conn.unwatched()
                done.set()


os.register_at_fork(after_in_child=Flusher._forget_after_fork)


class StreamConnection(Connection):
    """A TCP connection served by a thread or a child process (see module doc)."""

    def __init__(self, server: Any, handler_class: type, sock: socket.socket, peer: Any) -> None:
        super().__init__(server, handler_class, peer, sock.getsockname())
        self.sock = sock
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._pending = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watched = False
        self._broken = False
        self.reader = threading.get_ident()  # the thread that reads; built in that thread

    @property
    def buffered(self) -> int:
        return self._pending

    def write(self, data: bytes) -> None:
        if data and not self.closing:
            self._send(data)

    def _send(self, data: bytes) -> None:
        """Send ``data`` (bytes for the wire) now, or leave the rest to the flusher."""
        lock = self._lock
        lock.acquire()  # not ``with``: this is the write hot path
        try:
            if self._pending or self._broken:
                self._enqueue(data)
                return
            try:
                sent = self.sock.send(data, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._break()
                return
            self.bytes_out += sent
            if sent != len(data):
                self._enqueue(memoryview(data)[sent:])
        finally:
            lock.release()

    def _enqueue(self, data: bytes | memoryview) -> None:
        """Queue ``data`` for the flusher (lock held)."""
        if self._broken:
            return
        data = bytes(data)
        self._out.append(data)
        self._pending += len(data)
        if not self._watched:
            self._watched = True
            Flusher.get().watch(self)

    def receiver(self) -> Callable[[int], bytes]:
        """The reader's receive call, taking the most bytes wanted: :meth:`receive`, or
        the socket's own ``recv`` when a subclass (TLS) does not override it -- the
        reading hot path."""
        if type(self).receive is StreamConnection.receive:
            return self.sock.recv
        return self.receive

    def receive(self, size: int = RECV_SIZE) -> bytes:
        """The next bytes for the handler (at most ``size``; a subclass may ignore it),
        b"" at the end of input (reader thread; blocks). ``BlockingIOError`` when
        SO_RCVTIMEO expires, ``OSError`` on errors."""
        return self.sock.recv(size)

    def finish_output(self) -> None:
        """The input is over and the handler is done: queue the last bytes for the wire
        (TLS: close_notify) before the output drains."""

    def flush(self) -> bool:
        """Send pending output (flusher thread). True when nothing is left to watch."""
        with self._lock:
            out = self._out
            if len(out) > 1:
                joined = b"".join(out)
                out.clear()
                out.append(joined)
            while out:
                try:
                    sent = self.sock.send(out[0], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return False
                except OSError:
                    self._break()
                    break
                self.bytes_out += sent
                self._pending -= sent
                if sent < len(out[0]):
                    out[0] = memoryview(out[0])[sent:]
                else:
                    out.popleft()
            self._watched = False
            self._changed.notify_all()
            return True

    def unwatched(self) -> None:
        with self._lock:
            self._watched = False
            self._changed.notify_all()

    def close(self) -> None:
        with self._lock:
            if self.closing:
                return
            self.closing = True
            self._changed.notify_all()
        if threading.get_ident() != self.reader:
            _shutdown(self.sock, socket.SHUT_RD)  # wake the reader blocked in recv

    def abort(self) -> None:
        with self._lock:
            self.closing = True
            self._break()
        _shutdown(self.sock, socket.SHUT_RDWR)

    def _break(self) -> None:
        """Drop all pending output (lock held): the peer is gone or we gave up on it."""
        self._broken = True
        self._out.clear()
        self._pending = 0
        self._changed.notify_all()

    def wait_output_below(self, limit: int, timeout: float | None) -> bool:
        """Block the reader while pending output exceeds ``limit``; False if no progress in time."""
        with self._lock:
            while self._pending > limit and not self.closing:
                before = self._pending
                if not self._changed.wait(timeout) and self._pending == before:
                    return False
            return True

    def drain(self, timeout: float) -> None:
        """Wait until pending output is sent (or ``timeout`` passes); detach from the flusher."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending and not self._broken:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._break()
                    break
                self._changed.wait(remaining)
            watched = self._watched
        if watched:
            Flusher.get().forget(self)

    def wait_closing(self) -> None:
        with self._lock:
            while not self.closing:
                self._changed.wait()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or not connected


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO: ``recv`` fails with EAGAIN after ``seconds`` of silence, while the
    socket stays blocking, so ``send(..., MSG_DONTWAIT)`` still never waits."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def serve_stream(server: Any, sock: socket.socket, peer: Any, handler_class: type,
                 register: Any = None, connection: Any = StreamConnection) -> None:
    """Run one connection to its end in the calling thread.

    ``register(sock, conn)`` / ``register(sock, None)`` lets the server track it.
    ``connection(server, handler_class, sock, peer)`` makes the connection (a
    StreamConnection, or a subclass such as the TLS one). The caller closes the
    socket afterwards.
    """
    config = server.config
    conn = connection(server, handler_class, sock, peer)
    if register:
        register(sock, conn)
    exc: BaseException | None = None
    idle = config.idle_timeout
    if idle:
        set_receive_timeout(sock, idle)
    try:
        if conn.dispatch("connection_made"):
            exc = _read_loop(conn, config)
        conn.finish_output()
        conn.drain(config.shutdown_timeout)
    finally:
        if register:
            register(sock, None)
        conn.finished(exc)


def read_rest(recv: Callable[..., bytes], data: bytes) -> bytes:
    """``data`` filled a read of SMALL_RECV bytes: add what else is there now, without
    waiting, so it is handled in one piece."""
    try:
        return data + recv(RECV_SIZE, _DONTWAIT)
    except (BlockingIOError, InterruptedError):  # nothing more yet
        return data


def _read_loop(conn: StreamConnection, config: Any) -> BaseException | None:
    high, low = config.max_buffer, config.max_buffer // 2
    stall = config.idle_timeout or None
    data_received = conn.handler.data_received
    send = None
    if type(conn.handler) is EchoHandler:
        # Echo: what comes in goes out. On a plain connection this loop sends it
        # itself while nothing is pending: the reader is then the only writer (the
        # flusher is idle and the handler writes from no other thread), so the bytes
        # go out without the lock or a Python call. Pending output: write() queues.
        data_received = conn.write
        if type(conn) is StreamConnection:
            send = conn.sock.send
    receive = conn.receiver()
    plain = type(conn).receive is StreamConnection.receive  # TLS: receive() takes no flags
    size = SMALL_RECV  # (TLS ignores it)
    while not conn.closing:
        if conn._pending > high and not conn.wait_output_below(low, stall):
            log.info("closing %s: it has not read its output for %ss", format_address(conn.peer),
                     stall)
            conn.abort()
            return None
        try:
            data = receive(size)
            n = len(data)
            if n == SMALL_RECV and plain:
                data = read_rest(receive, data)
                n = len(data)
        except BlockingIOError:  # SO_RCVTIMEO expired
            log.debug("closing %s: idle for %ss", format_address(conn.peer), config.idle_timeout)
            conn.close()
            return None
        except OSError as exc:
            conn.abort()
            return exc
        if conn.closing:
            return None
        if not data:
            if conn.dispatch("eof_received"):
                conn.wait_closing()
            return None
        size = SMALL_RECV if n < SMALL_RECV else RECV_SIZE
        conn.bytes_in += n
        if send is not None and not conn._pending and not conn._broken:
            try:
                sent = send(data, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # the peer is gone: the next receive tells how
                with conn._lock:
                    conn._break()
                continue
            conn.bytes_out += sent  # (the flusher counts only while output is pending)
            if sent == n:
                continue
            data = memoryview(data)[sent:]
        try:
            data_received(data)
        except Exception:
            conn.dispatch_failed("data_received")
    return None
