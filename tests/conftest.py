"""Fixtures: servers in-process (a thread runs serve_forever) and as `python -m sockserv`
subprocesses, plus real-socket clients. Every wait is bounded; nothing sleeps."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sockserv import Config
from sockserv.engines import ENGINES

ROOT = Path(__file__).resolve().parent.parent
ENGINE_NAMES = sorted({engine for engine, _ in ENGINES})
PROTOS = ["tcp", "udp"]


@pytest.fixture
def serve():
    """``serve(cls_or_engine, handler, proto="tcp", **settings)``: a running server
    (at the Unix socket path ``unix=PATH``, if given)."""
    running = []

    def start(cls, handler, proto="tcp", host="127.0.0.1", **settings):
        if isinstance(cls, str):
            cls = ENGINES[cls, proto]
        settings.setdefault("shutdown_timeout", 3.0)
        config = Config(host=host, port=0, proto=proto, **settings)
        server = cls(config.unix or (host, 0), handler, config=config)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        assert server.wait_serving(5)
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(5)


class CLIServer:
    """A `python -m sockserv` subprocess; its stderr lines arrive in a queue. ``prefix``
    is a command that runs it (e.g. systemd-socket-activate and its options)."""

    def __init__(self, args, env=None, cwd=None, prefix=(), stdin=subprocess.DEVNULL):
        self.args = args
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSERV_")}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), cwd or "",
                                                                full_env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "sockserv", *args],
                                     stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = None

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pattern, timeout=10.0):
        """The first stderr line matching ``pattern`` (regex), waiting for it."""
        deadline = time.monotonic() + timeout
        for line in self.seen:
            if re.search(pattern, line):
                return line
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout}s; "
                                     f"saw {self.seen}") from None
            if line is None:
                raise AssertionError(f"server exited ({self.proc.wait()}) before {pattern!r}; "
                                     f"saw {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def wait_serving(self, timeout=10.0):
        line = self.wait_line(r"serving .* on ", timeout)
        self.port = int(re.search(r":(\d+) \(engine", line).group(1))
        return self.port

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=15.0):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def cli():
    """``cli(*args, env=None, cwd=None, prefix=(), stdin=DEVNULL)``: a `python -m sockserv`
    subprocess (run by ``prefix``, if given), stopped at the end."""
    started = []

    def start(*args, env=None, cwd=None, prefix=(), stdin=subprocess.DEVNULL):
        server = CLIServer(list(args), env=env, cwd=cwd, prefix=prefix, stdin=stdin)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run_cli(*args, env=None, timeout=20, cwd=None):
    """Run `python -m sockserv ARGS` to completion; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSERV_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), cwd or ""]))
    return subprocess.run([sys.executable, "-m", "sockserv", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def connect(port, host="127.0.0.1", timeout=10.0):
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def hangup(sock):
    """Close a client for good. A fork-engine server running inside the test process
    forks children that inherit the test's client sockets, so a plain close() would
    not send FIN while a child holds a copy; shutdown() acts on the socket itself."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def recv_exactly(sock, n):
    """Read exactly n bytes (the socket's timeout bounds each wait)."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise AssertionError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock):
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def udp_client(timeout=5.0, family=socket.AF_INET):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid):
    """PIDs whose parent is ``pid`` (from /proc), zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                found.append((int(entry.name), fields[0]))
    return found


def wait_for(predicate, timeout=10.0, what="condition"):
    """Wait for a state no event announces (a child reaped, a thread gone); bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def many_tcp_clients(port, clients, messages, size=32, timeout=60.0, host="127.0.0.1"):
    """``clients`` concurrent connections, each doing ``messages`` echo round trips of
    distinct payloads; returns the number of round trips verified."""
    import selectors

    sel = selectors.DefaultSelector()
    state = {}
    for _ in range(clients):
        sock = socket.create_connection((host, port), timeout=10)
        sock.setblocking(False)
        state[sock] = [0, b"", None]  # messages done, bytes received, payload expected
    verified = 0
    deadline = time.monotonic() + timeout

    def send_next(sock):
        st = state[sock]
        payload = (b"%d:%d:" % (sock.fileno(), st[0])).ljust(size, b"x")
        st[1], st[2] = b"", payload
        sock.sendall(payload)

    for sock in state:
        sel.register(sock, selectors.EVENT_READ)
        send_next(sock)
    try:
        while sel.get_map():
            if time.monotonic() > deadline:
                raise AssertionError(f"only {verified} round trips in {timeout}s")
            for key, _ in sel.select(1.0):
                sock = key.fileobj
                st = state[sock]
                chunk = sock.recv(65536)
                assert chunk, "server closed a client connection"
                st[1] += chunk
                if len(st[1]) >= size:
                    assert st[1] == st[2], (st[1], st[2])
                    verified += 1
                    st[0] += 1
                    if st[0] == messages:
                        sel.unregister(sock)
                    else:
                        send_next(sock)
    finally:
        for sock in state:
            sock.close()
        sel.close()
    return verified


def many_udp_clients(port, clients, messages, timeout=60.0, host="127.0.0.1"):
    """Like many_tcp_clients over UDP: one datagram outstanding per client; a lost
    datagram (loopback rarely loses any) is resent after a second."""
    import selectors

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sel = selectors.DefaultSelector()
    state = {}
    for _ in range(clients):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((host, port))
        state[sock] = [0, None, 0.0]
        sel.register(sock, selectors.EVENT_READ)
    verified = 0
    deadline = time.monotonic() + timeout

    def send(sock):
        st = state[sock]
        st[1] = b"%d:%d" % (sock.fileno(), st[0])
        st[2] = time.monotonic()
        sock.send(st[1])

    for sock in state:
        send(sock)
    try:
        while sel.get_map():
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"only {verified} UDP round trips in {timeout}s")
            for key, _ in sel.select(0.5):
                sock = key.fileobj
                st = state[sock]
                data = sock.recv(65536)
                if data != st[1]:
                    continue  # a late answer to a resent datagram
                verified += 1
                st[0] += 1
                if st[0] == messages:
                    sel.unregister(sock)
                else:
                    send(sock)
            for sock in list(sel.get_map().values()):
                if now - state[sock.fileobj][2] > 1.0:
                    send(sock.fileobj)
    finally:
        for sock in state:
            sock.close()
        sel.close()
    return verified
