"""UDP peers as connections: one Handler per peer address, for the thread and fork engines.

A peer is created by its first datagram and expires after ``udp_idle`` seconds
without one. Its datagrams reach it through an inbox (a queue for a thread, a
datagram socketpair for a child process); it answers with ``sendto`` on the
server's socket, never blocking (a datagram the kernel cannot take is dropped).
"""

from __future__ import annotations

import socket
from typing import Any

from ..connection import Connection

__all__ = ["DatagramPeer"]


class DatagramPeer(Connection):
    """One UDP peer, as its handler sees it: each ``write`` is one datagram back."""

    datagram = True

    def __init__(self, server: Any, handler_class: type, peer: Any) -> None:
        super().__init__(server, handler_class, peer, server.server_address)
        self.sock = server.socket

    def write(self, data: bytes) -> None:
        if self.closing:  # an empty datagram is still a datagram
            return
        if self.peer is None:  # an unbound Unix datagram client: there is no way back
            self.server.stats.drop()
            return
        try:
            self.bytes_out += self.sock.sendto(data, socket.MSG_DONTWAIT, self.peer)
        except OSError:  # EAGAIN, EMSGSIZE, or the peer's ICMP error: UDP loses it
            self.server.stats.drop()

    def close(self) -> None:
        self.closing = True

    def received(self, data: bytes) -> None:
        """Hand one datagram to the handler."""
        self.bytes_in += len(data)
        self.dispatch("data_received", data)
