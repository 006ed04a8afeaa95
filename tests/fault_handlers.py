"""Handlers the fault suite runs in `sockserv serve` subprocesses (a module apart from
the tests, so a server imports nothing but sockserv)."""

from __future__ import annotations

import os
import signal
import threading

from sockserv import EchoHandler, LineHandler


class PidEcho(EchoHandler):
    """Echo, after greeting with the serving process's pid (which worker has whom)."""

    def connection_made(self):
        self.conn.write(b"%d\n" % os.getpid())


class LineEcho(LineHandler):
    """Every line back, with "\\n"."""

    def line_received(self, line):
        self.conn.write(line + b"\n")


class StopsFromItsThread(LineHandler):
    """``stop``: SIGTERM to this connection's own thread, not the serve loop's (the
    kernel may hand a process its signal in any thread)."""

    def line_received(self, line):
        if line == b"stop":
            self.conn.write(b"%d\n" % os.getpid())
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
