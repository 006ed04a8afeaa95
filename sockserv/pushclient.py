"""Small push clients: ``sockserv publish CHANNEL MESSAGE`` and ``sockserv subscribe CHANNEL...``.

``publish`` sends one ``PUB`` and waits for the reply: ``+OK`` exits 0; ``-ERR``
prints it (one line on stderr) and exits 1, as does a server that cannot be
reached or does not answer within ``--timeout`` seconds. A MESSAGE containing a
newline is a usage error (exit 2).

``subscribe`` sends one ``SUB`` per channel, waits for each ``+OK`` (an ``-ERR``
exits 1), says ``sockserv: subscribed to ...`` on stderr, then prints each ``MSG``
line as it arrives on stdout, flushed line by line. Ctrl-C (SIGINT) and SIGTERM
exit 0; the server closing the connection exits 1. Over UDP it resends an
unanswered ``SUB`` every second (``SUB`` is idempotent), and sends ``PING`` every
``--keepalive`` seconds so that its subscriptions outlive the server's
``udp_idle``. Over UDP ``publish`` sends its ``PUB`` once (a resent ``PUB`` could be
delivered twice).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from .connection import format_address

__all__ = ["PushClient", "publish", "subscribe"]

DEFAULT_PORT = 7070


class PushClient:
    """A blocking connection to a push server that reads whole lines, over TCP or UDP
    (over UDP each datagram holds one or more lines)."""

    def __init__(self, host: str, port: int, proto: str = "tcp", timeout: float = 10.0) -> None:
        self.proto = proto
        self.where = f"{proto} {format_address((host, port))}"
        if proto == "udp":
            family, kind, protocol, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(family, kind, protocol)
            try:
                self.sock.connect(address)
            except BaseException:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._lines: deque[bytes] = deque()
        self._partial = b""

    def send(self, line: bytes) -> None:
        """Send one command line (the terminator is added)."""
        self.sock.sendall(line + b"\n")

    def read_line(self) -> bytes | None:
        """The next line from the server (without terminator); None when it closed.
        Raises TimeoutError after the socket's timeout."""
        while not self._lines:
            data = self.sock.recv(65536)
            if self.proto == "udp":
                lines = data.split(b"\n")
                if lines[-1] == b"" and len(lines) > 1:
                    lines.pop()
            else:
                if not data:
                    return None
                lines = (self._partial + data).split(b"\n")
                self._partial = lines.pop()
            self._lines.extend(line[:-1] if line.endswith(b"\r") else line for line in lines)
        return self._lines.popleft()

    def reply(self, on_message: Callable[[bytes], None] | None = None) -> bytes | None:
        """The next reply line (``+...`` or ``-ERR ...``); ``MSG`` lines met before it go to
        ``on_message``. None when the server closed the connection."""
        while True:
            line = self.read_line()
            if line is None or not line.startswith(b"MSG "):
                return line
            if on_message is not None:
                on_message(line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PushClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Tool:
    """One client command for the CLI: ``add_arguments(parser)``, ``main(args) -> int``."""

    def __init__(self, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 main: Callable[[argparse.Namespace], int]) -> None:
        self.__doc__ = doc
        self.add_arguments = add_arguments
        self.main = main


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(value)
    return port


_port.__name__ = "port"  # argparse names the type in its error: "invalid port value"


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds < float("inf"):
        raise ValueError(value)
    return seconds


_seconds.__name__ = "seconds"


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--proto", choices=["tcp", "udp"], default="tcp",
                        help="transport (default: tcp)")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="how long to wait for the server to connect and answer "
                             "(default: 10)")


def _fail(message: str, status: int = 1) -> int:
    print(f"sockserv: error: {message}", file=sys.stderr, flush=True)
    return status


def _session(args: argparse.Namespace, body: Callable[[PushClient], int]) -> int:
    """Connect, run ``body(client)``, and turn network failures into one error line."""
    try:
        client = PushClient(args.host, args.port, args.proto, args.timeout)
    except OSError as exc:
        where = f"{args.proto} {format_address((args.host, args.port))}"
        return _fail(f"cannot connect to {where}: {exc.strerror or exc}")
    with client:
        try:
            return body(client)
        except TimeoutError:
            return _fail(f"no reply from {client.where} within {args.timeout:g}s")
        except OSError as exc:
            return _fail(f"{client.where}: {exc.strerror or exc}")


def _bad_channel(channel: bytes) -> int | None:
    """Exit status 2 with one line for a CHANNEL argument that cannot be sent as one."""
    if channel and not any(c in channel for c in (b" ", b"\n", b"\r")):
        return None
    return _fail(f"CHANNEL {os.fsdecode(channel)!r} cannot be empty or contain spaces or "
                 "line breaks", 2)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


# -- publish ------------------------------------------------------------------------------


def _publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("channel", metavar="CHANNEL", help="1-128 bytes of A-Z a-z 0-9 . _ : -")
    parser.add_argument("message", metavar="MESSAGE", help="the payload (one line)")
    _add_connection_arguments(parser)


def _publish_main(args: argparse.Namespace) -> int:
    channel, message = os.fsencode(args.channel), os.fsencode(args.message)
    if b"\n" in message or b"\r" in message:
        return _fail("MESSAGE cannot contain a line break", 2)
    bad = _bad_channel(channel)
    if bad is not None:
        return bad

    def body(client: PushClient) -> int:
        client.send(b"PUB " + channel + b" " + message)
        reply = client.reply()
        if reply is None:
            return _fail(f"{client.where} closed the connection without a reply")
        if reply == b"+OK":
            return 0
        return _fail(f"{client.where} refused it: {_text(reply)}")

    return _session(args, body)


publish = _Tool("publish one message (PUB CHANNEL MESSAGE) to a push server\n\n" + __doc__,
                _publish_arguments, _publish_main)


# -- subscribe ----------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM or SIGINT: stop subscribing."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stop


def _subscribe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("channels", metavar="CHANNEL", nargs="+", help="channels to follow")
    _add_connection_arguments(parser)
    parser.add_argument("--keepalive", type=_seconds, default=20.0, metavar="SECONDS",
                        help="UDP: send PING after this long without sending, to keep the "
                             "subscriptions alive (default: 20)")


def _subscribe_main(args: argparse.Namespace) -> int:
    channels = [os.fsencode(channel) for channel in args.channels]
    for channel in channels:
        bad = _bad_channel(channel)
        if bad is not None:
            return bad
    out = sys.stdout.buffer
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _subscribe(args, channels, out)
    except _Stop:
        return 0
    except BrokenPipeError:  # e.g. `sockserv subscribe news | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        os.close(devnull)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _subscribe(args: argparse.Namespace, channels: list[bytes], out: BinaryIO) -> int:
    def show(line: bytes) -> None:
        out.write(line + b"\n")
        out.flush()

    def body(client: PushClient) -> int:
        for channel in channels:
            reply = _subscribe_one(client, channel, args.timeout, show)
            if reply is None:
                return _fail(f"{client.where} closed the connection")
            if reply != b"+OK":
                return _fail(f"{client.where} refused SUB {_text(channel)}: {_text(reply)}")
        print(f"sockserv: subscribed to {', '.join(map(_text, channels))} on {client.where}",
              file=sys.stderr, flush=True)
        return _follow(client, args, show)

    return _session(args, body)


def _subscribe_one(client: PushClient, channel: bytes, timeout: float,
                   show: Callable[[bytes], None]) -> bytes | None:
    """SUB one channel; over UDP resend it every second until answered."""
    if client.proto == "tcp":
        client.send(b"SUB " + channel)
        return client.reply(show)
    deadline = time.monotonic() + timeout
    while True:
        client.send(b"SUB " + channel)
        client.sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
        try:
            return client.reply(show)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise


def _follow(client: PushClient, args: argparse.Namespace, show: Callable[[bytes], None]) -> int:
    """Print MSG lines until the server closes the connection (or a signal stops us)."""
    udp = client.proto == "udp"
    client.sock.settimeout(None)
    next_ping = time.monotonic() + args.keepalive
    error = None
    while True:
        try:
            if udp:  # the lease counts datagrams from us: renew it every keepalive seconds
                now = time.monotonic()
                if now >= next_ping:
                    client.send(b"PING")
                    next_ping = now + args.keepalive
                client.sock.settimeout(next_ping - now)
            line = client.read_line()
        except TimeoutError:
            continue
        if line is None:
            detail = f" ({_text(error)})" if error else ""
            return _fail(f"{client.where} closed the connection{detail}")
        if line.startswith(b"MSG "):
            show(line)
        elif line.startswith(b"-ERR"):
            error = line


subscribe = _Tool("print the messages of push channels as they arrive\n\n" + __doc__,
                  _subscribe_arguments, _subscribe_main)
