"""Baseline servers for compare.py: the standard library's own ways to write them.

    python baselines.py KIND [--host 127.0.0.1] [--port 7007] [--uvloop]

KIND is one of:

  threading         socketserver.ThreadingTCPServer; the handler loops recv(65536) + sendall
  forking           socketserver.ForkingTCPServer, the same handler
  asyncio-protocol  asyncio Protocol: data_received -> transport.write
  asyncio-streams   asyncio streams: reader.read(65536) -> writer.write + drain
  asyncio-udp       asyncio DatagramProtocol: each datagram back to its sender
  asyncio-push      the push protocol of DESIGN.md (SUB/UNSUB/PUB/PING) on one asyncio
                    Protocol: a dict channel -> set of transports, each message encoded once

Limits are raised so they don't decide the outcome: listen backlog 1024 (as sockserv),
ForkingMixIn.max_children 20000 (default 40). Prints "listening on HOST:PORT (pid N)" on
stderr when ready; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socketserver
import sys

BACKLOG = 1024


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


class ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = BACKLOG


class ForkingServer(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = BACKLOG
    max_children = 20000


def run_socketserver(cls, host, port):
    server = cls((host, port), EchoHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready(host, server.server_address[1])
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class EchoDatagram(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def echo_stream(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


CHANNEL = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
MAX_LINE = 65536


class PushProtocol(asyncio.Protocol):
    """The push protocol, as one would write it on asyncio."""

    channels: dict[bytes, set[asyncio.Transport]] = {}

    def connection_made(self, transport):
        self.transport = transport
        self.subs: set[bytes] = set()
        self.buf = b""

    def data_received(self, data):
        data = self.buf + data if self.buf else data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        if len(self.buf) > MAX_LINE:
            self.transport.write(b"-ERR line too long\n")
            self.transport.close()
            return
        write = self.transport.write
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            cmd, _, rest = line.partition(b" ")
            if cmd == b"PUB":
                channel, _, payload = rest.partition(b" ")
                if not CHANNEL.match(channel):
                    write(b"-ERR bad channel\n")
                    continue
                message = b"MSG " + channel + b" " + payload + b"\n"  # encoded once
                for transport in self.channels.get(channel, ()):
                    transport.write(message)
                write(b"+OK\n")
            elif cmd in (b"SUB", b"UNSUB"):
                if not CHANNEL.match(rest):
                    write(b"-ERR bad channel\n")
                    continue
                if cmd == b"SUB":
                    self.channels.setdefault(rest, set()).add(self.transport)
                    self.subs.add(rest)
                else:
                    self._leave(rest)
                write(b"+OK\n")
            elif cmd == b"PING":
                write(b"+PONG" + (b" " + rest if rest else b"") + b"\n")
            else:
                write(b"-ERR unknown command\n")

    def _leave(self, channel):
        subscribers = self.channels.get(channel)
        if subscribers is not None:
            subscribers.discard(self.transport)
            if not subscribers:
                del self.channels[channel]
        self.subs.discard(channel)

    def connection_lost(self, exc):
        for channel in list(self.subs):
            self._leave(channel)


async def run_asyncio(kind, host, port):
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    if kind == "asyncio-udp":
        transport, _ = await loop.create_datagram_endpoint(EchoDatagram, local_addr=(host, port))
        ready(host, transport.get_extra_info("sockname")[1])
        await stop
        transport.close()
        return
    if kind == "asyncio-streams":
        server = await asyncio.start_server(echo_stream, host, port, backlog=BACKLOG)
    else:
        factory = PushProtocol if kind == "asyncio-push" else EchoProtocol
        server = await loop.create_server(factory, host, port, backlog=BACKLOG)
    ready(host, server.sockets[0].getsockname()[1])
    await stop
    server.close()


def ready(host, port):
    print(f"listening on {host}:{port} (pid {os.getpid()})", file=sys.stderr, flush=True)


KINDS = ["threading", "forking", "asyncio-protocol", "asyncio-streams", "asyncio-udp",
         "asyncio-push"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7007)
    parser.add_argument("--uvloop", action="store_true", help="asyncio kinds: run on uvloop")
    args = parser.parse_args(argv)
    if args.kind == "threading":
        run_socketserver(ThreadingServer, args.host, args.port)
    elif args.kind == "forking":
        run_socketserver(ForkingServer, args.host, args.port)
    else:
        if args.uvloop:
            import uvloop

            uvloop.install()
        asyncio.run(run_asyncio(args.kind, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
