"""Making listening sockets from a Config (for supervisors and SO_REUSEPORT workers)."""

from __future__ import annotations

import socket

from ..config import Config

__all__ = ["bind_listener"]


def bind_listener(config: Config, reuse_port: bool = False) -> socket.socket:
    """A socket bound at ``config.host``:``config.port`` (listening, for TCP)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    kind = socket.SOCK_STREAM if config.proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((config.host, config.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return sock
