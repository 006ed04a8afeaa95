"""sockserv: classic socket servers (echo, push, your own handlers) on the standard library.

Public API: the server classes of every engine, the handler classes, and Config.
"""

__version__ = "0.1.0"

from .config import Config, ConfigError
from .engines import (
    ForkingTCPServer,
    ForkingUDPServer,
    SelectorTCPServer,
    SelectorUDPServer,
    TCPServer,
    ThreadingTCPServer,
    ThreadingUDPServer,
    UDPServer,
    make_server,
)
from .framing import LineFramer
from .handlers import EchoHandler, Handler, LineHandler
from .push import Hub, PushHandler

__all__ = [
    "Config",
    "ConfigError",
    "EchoHandler",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "Handler",
    "Hub",
    "LineFramer",
    "LineHandler",
    "PushHandler",
    "SelectorTCPServer",
    "SelectorUDPServer",
    "TCPServer",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "UDPServer",
    "__version__",
    "make_server",
]
