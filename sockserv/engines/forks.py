"""The ``fork`` engine: a child process per TCP connection, per UDP peer (sockserv
Handlers) or per datagram (classic handlers), at most ``max_connections`` at once.

Each child is watched through a pidfd in the serve loop, so it is reaped the
moment it exits (no SIGCHLD handler, no zombies, no polling). At the limit the
server stops accepting, as the thread engine does. A child treats SIGTERM and
SIGINT as "input is over": its connection sees end of input, flushes and closes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import time
from typing import Any

from ..relay import Relay
from .base import RESOURCE_ERRORS, ServerMixin
from .peers import DatagramPeer
from .proxied import close_waits

__all__ = ["ForkingTCPServer", "ForkingUDPServer"]

log = logging.getLogger("sockserv")


class ForkEngine(ServerMixin):
    """Bookkeeping shared by the forking servers: fork, watch, reap and stop children."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._children: dict[int, int] = {}  # pid -> pidfd
        self.relay: Relay | None = None
        super().__init__(*args, **kwargs)
        if getattr(self.handler_class, "uses_hub", False):
            self.relay = Relay(self.hub, self)  # push messages between the children

    def has_capacity(self) -> bool:
        return len(self._children) + len(self._header_waits) < self.config.max_connections

    def live_count(self) -> int:
        return len(self._children)

    def get_request(self) -> Any:
        """Accept (TCP) only while a descriptor is left for the new child's pidfd too:
        out of descriptors, accepting pauses (see ServerMixin.get_request) and the
        connection waits in the backlog, instead of being accepted and then lost."""
        if self.socket_type != socket.SOCK_STREAM:
            return super().get_request()
        try:
            spare = os.dup(self._wake_r)  # held across accept, freed for the pidfd
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self.accept_failed(exc)
            raise
        try:
            return super().get_request()
        finally:
            os.close(spare)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the request in a new child process."""
        pid = os.fork()
        if pid:
            if self._adopt_or_end(pid):
                self.transfer_peer(request, pid)  # counted per address until reaped
            self.close_request(request)
            return
        self._child_main(request, client_address)

    def _adopt_or_end(self, pid: int) -> bool:
        """Adopt a new child; if no descriptor is left for its pidfd (another thread took
        the one get_request freed), kill it rather than leave it unwatched and unreaped."""
        try:
            self._adopt(pid)
            return True
        except OSError as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.accept_failed(exc)
            return False

    def _child_main(self, request: Any, client_address: Any,
                    inbox: socket.socket | None = None) -> None:
        """The whole life of a child: serve the request (or the UDP peer), then ``_exit``."""
        status = 1
        try:
            if inbox is None:
                self._become_child(request if isinstance(request, socket.socket) else None)
                self.finish_request(request, client_address)
            else:
                self._become_child(None)
                self._serve_peer(client_address, inbox)
            status = 0
        except Exception:
            self.handle_error(request, client_address)
        finally:
            try:
                if inbox is None:
                    self.shutdown_request(request)
                if self.relay is not None:
                    self.relay.child_exit()
            finally:
                os._exit(status)

    def _adopt(self, pid: int) -> None:
        fd = os.pidfd_open(pid)
        self._children[pid] = fd
        self.stats.opened()
        self.watch(fd, lambda: self._reap(pid))
        if self.relay is not None:
            self.relay.adopt(pid)

    def _reap(self, pid: int) -> None:
        fd = self._children[pid]
        self.unwatch(fd)
        os.close(fd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # SIGCHLD ignored by the embedding program: already reaped
            status = 0
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL:
            log.warning("child %d died of signal %d", pid, os.WTERMSIG(status))
        try:
            if self.relay is not None:
                self.relay.detach(pid)
            self.release_peer(pid)
            self.stats.closed()
        finally:
            # Last: whoever sees live_count() drop also sees the child's peer released.
            del self._children[pid]
        self.child_exited(pid)

    def child_exited(self, pid: int) -> None:
        """Hook: a child has been reaped."""

    def _become_child(self, input_sock: socket.socket | None) -> None:
        """In a new child: drop the parent's descriptors, make SIGTERM end the input."""
        self._selector.close()
        signal.set_wakeup_fd(-1)  # it named the parent's wakeup pipe, closed here
        for fd in (self._wake_r, self._wake_w, *self._children.values()):
            os.close(fd)
        self._children = {}
        close_waits(self, in_child=True)  # connections the parent waits on for a PROXY header
        if self.bus is not None:  # the parent's: this child reaches it through the relay
            self.bus.forget()
            self.bus = None
        if self.relay is not None:
            self.relay.become_child()
        if self.socket_type == socket.SOCK_STREAM:
            self.socket.close()

        def end_input(signum: int, frame: Any) -> None:
            if input_sock is not None:
                try:
                    input_sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

        signal.signal(signal.SIGTERM, end_input)
        signal.signal(signal.SIGINT, end_input)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def server_close(self) -> None:
        super().server_close()
        if self.relay is not None:
            self.relay.close()

    def end_input(self) -> None:
        self._signal_children(signal.SIGTERM)

    def abort_all(self) -> None:
        self._signal_children(signal.SIGKILL)

    def _signal_children(self, signum: int) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait_idle(self, deadline: float) -> bool:
        while self._children:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self._selector.select(remaining):
                if key.data is not None:
                    key.data()
                elif key.fileobj == self._wake_r:
                    self._drain_wakeup()
        return True


class ForkingTCPServer(ForkEngine, socketserver.TCPServer):
    """Drop-in for ``socketserver.ForkingTCPServer``; runs classic and sockserv handlers."""


class ForkingUDPServer(ForkEngine, socketserver.UDPServer):
    """Drop-in for ``socketserver.ForkingUDPServer``. A classic handler gets a child per
    datagram (as in the stdlib); a sockserv Handler gets one child per peer, fed
    through a datagram socketpair (a datagram that finds the peer's inbox full is
    dropped). Each datagram travels with a one-byte prefix; an empty one ends the child."""

    allow_reuse_address = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._inboxes: dict[Any, socket.socket] = {}  # peer address -> parent's end
        self._peer_of: dict[int, Any] = {}  # pid -> peer address
        super().__init__(*args, **kwargs)

    def has_capacity(self) -> bool:
        return self.handler_class is not None or super().has_capacity()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.handler_class is None:
            return super().process_request(request, client_address)
        data = request[0]
        inbox = self._inboxes.get(client_address)
        if inbox is not None:
            try:
                inbox.send(b"d" + data, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                self.stats.drop()
                return
            except OSError:  # the child just expired: start a new one
                pass
        if len(self._children) >= self.config.max_connections:
            self.stats.drop()
            return
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:  # out of descriptors: a new peer must wait (UDP: dropped)
            self.stats.drop()
            self.accept_failed(exc)
            return
        parent_end.send(b"d" + data)  # the prefix keeps an empty datagram apart from EOF
        pid = os.fork()
        if pid:
            child_end.close()
            if not self._adopt_or_end(pid):
                parent_end.close()
                self.stats.drop()
                return
            self._inboxes[client_address] = parent_end
            self._peer_of[pid] = client_address
            return
        parent_end.close()
        for other in self._inboxes.values():
            other.close()
        self._child_main(request, client_address, inbox=child_end)

    def _serve_peer(self, peer: Any, inbox: socket.socket) -> None:
        conn = DatagramPeer(self, self.handler_class, peer)
        inbox.settimeout(self.config.udp_idle or None)
        try:
            if not conn.dispatch("connection_made"):
                return
            while not conn.closing:
                try:
                    data = inbox.recv(self.max_packet_size + 1)
                except TimeoutError:
                    return
                if not data:  # the end marker: the server is stopping
                    return
                conn.received(data[1:])
        finally:
            conn.finished(None)

    def end_input(self) -> None:
        for inbox in self._inboxes.values():
            try:
                inbox.send(b"", socket.MSG_DONTWAIT)  # the end marker (data carries a prefix)
            except OSError:
                pass  # full or gone: shutdown_timeout will end that child
        super().end_input()

    def child_exited(self, pid: int) -> None:
        peer = self._peer_of.pop(pid, None)
        if peer is not None:
            self._inboxes.pop(peer).close()
