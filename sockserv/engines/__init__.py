"""The engines, and :func:`make_server`, which picks one from a Config.

``select`` is one event loop per process; ``thread`` and ``fork`` build on
``socketserver``'s mixins. Every server class takes the stdlib constructor.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from .base import ServerMixin, Stats
from .forks import ForkingTCPServer, ForkingUDPServer
from .plain import TCPServer, UDPServer
from .selector import SelectorTCPServer, SelectorUDPServer
from .threads import ThreadingTCPServer, ThreadingUDPServer

__all__ = [
    "ENGINES", "ForkingTCPServer", "ForkingUDPServer", "SelectorTCPServer", "SelectorUDPServer",
    "ServerMixin", "Stats", "TCPServer", "ThreadingTCPServer", "ThreadingUDPServer", "UDPServer",
    "make_server",
]

ENGINES: dict[tuple[str, str], type[ServerMixin]] = {
    ("select", "tcp"): SelectorTCPServer,
    ("select", "udp"): SelectorUDPServer,
    ("thread", "tcp"): ThreadingTCPServer,
    ("thread", "udp"): ThreadingUDPServer,
    ("fork", "tcp"): ForkingTCPServer,
    ("fork", "udp"): ForkingUDPServer,
}


def make_server(config: Config, handler_class: type, bind_and_activate: bool = True) -> Any:
    """Build (and by default bind) the server that ``config.engine`` and ``config.proto`` name,
    at ``config.unix`` (a Unix socket path) if set, else at ``config.host``:``config.port``."""
    cls = ENGINES[config.engine, config.proto]
    address = config.unix if config.unix else (config.host, config.port)
    return cls(address, handler_class, bind_and_activate, config=config)
