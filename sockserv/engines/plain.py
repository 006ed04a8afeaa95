"""``TCPServer`` and ``UDPServer``: one request at a time, as in ``socketserver``,
with sockserv's config, logging, shutdown and Handler support added."""

from __future__ import annotations

import socketserver
import time
from typing import Any

from .base import ServerMixin
from .peers import DatagramPeer

__all__ = ["TCPServer", "UDPServer"]


class TCPServer(ServerMixin, socketserver.TCPServer):
    """Drop-in for ``socketserver.TCPServer``: serves one connection at a time."""


class UDPServer(ServerMixin, socketserver.UDPServer):
    """Drop-in for ``socketserver.UDPServer``. A sockserv Handler gets one instance per
    peer, run in the serving thread, expired after ``udp_idle`` seconds of silence."""

    allow_reuse_address = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._peers: dict[Any, tuple[DatagramPeer, float]] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.handler_class is None:
            return super().process_request(request, client_address)
        entry = self._peers.get(client_address)
        if entry is None:
            if len(self._peers) >= self.config.max_connections:
                self.stats.drop()
                return
            conn = DatagramPeer(self, self.handler_class, client_address)
            self.stats.opened()
            if not conn.dispatch("connection_made"):
                return self._end(conn)
        else:
            conn = entry[0]
        self._peers[client_address] = (conn, time.monotonic())
        conn.received(request[0])
        if conn.closing:
            self._end(conn)

    def _end(self, conn: DatagramPeer) -> None:
        self._peers.pop(conn.peer, None)
        self.stats.closed()
        conn.finished(None)

    def next_timeout(self) -> float | None:
        if not self._peers or not self.config.udp_idle:
            return None
        oldest = min(seen for _, seen in self._peers.values())
        return max(0.0, oldest + self.config.udp_idle - time.monotonic())

    def service_actions(self) -> None:
        if self.config.udp_idle:
            expired = time.monotonic() - self.config.udp_idle
            for conn, seen in list(self._peers.values()):
                if seen <= expired:
                    self._end(conn)

    def live_count(self) -> int:
        return len(self._peers)

    def end_input(self) -> None:
        for conn, _ in list(self._peers.values()):
            self._end(conn)
