"""Fixtures: servers in-process (a thread runs serve_forever) and as `python -m sockserv`
subprocesses, plus real-socket clients. Every wait is bounded; nothing sleeps."""

from __future__ import annotations

import os
import queue
import re
import shutil
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


def read_line(sock):
    """One line (ending in ``\n``) from a blocking socket, read a byte at a time so
    nothing after it is consumed; fails if the peer closes first."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed after {line!r}"
        line += chunk
    return line


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


# -- a real redis-server (the push bus) ----------------------------------------------

REDIS = shutil.which("redis-server")


class RedisServer:
    """A real ``redis-server`` on a loopback port, no persistence, started and stopped
    by PID; :meth:`stop` then :meth:`start` brings it back on the same port. With
    ``tls`` (cert, key, ca) it serves TLS only, on that port."""

    def __init__(self, directory, port=None, password=None, tls=None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.proc = None

    def url(self, password=None, db=None):
        """``redis://[:password@]127.0.0.1:PORT[/db]`` (``rediss://localhost`` with TLS)."""
        from urllib.parse import quote

        auth = f":{quote(password, safe='')}@" if password else ""
        host = "localhost" if self.tls else "127.0.0.1"
        return (f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}"
                + (f"/{db}" if db is not None else ""))

    def start(self, timeout=10.0):
        """Start it and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        args = [REDIS, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def answers():
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"redis-server exited ({self.proc.returncode}): {log}")
            try:
                return self.command("PING") == "PONG"
            except OSError:
                return False

        wait_for(answers, timeout, what=f"redis-server on port {self.port}")
        return self

    def stop(self):
        """SIGTERM (by PID) and wait; SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def connect(self, timeout=5.0):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls:
            import ssl

            context = ssl.create_default_context(cafile=self.tls[2])
            sock = context.wrap_socket(sock, server_hostname="localhost")
        return sock

    def command(self, *args):
        """Run one command (AUTH first, with a password) on a new connection; returns
        the reply as sockserv.resp parses it."""
        from sockserv.resp import Parser, ReplyError, encode_command

        with self.connect() as sock:
            commands = [("AUTH", self.password)] if self.password else []
            commands.append(args)
            sock.sendall(b"".join(encode_command(*c) for c in commands))
            parser, replies = Parser(), []
            while len(replies) < len(commands):
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                replies += parser.feed(data)
        if commands[0][0] == "AUTH" and isinstance(replies[0], ReplyError):
            raise replies[0]
        return replies[-1]

    def info(self, section):
        """``INFO section`` as a dict of strings."""
        text = self.command("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@pytest.fixture
def redis_server(tmp_path):
    """``redis_server(password=None, port=None, tls=None, start=True)``: a RedisServer
    (skips without redis-server), stopped at the end."""
    made = []

    def make(password=None, port=None, tls=None, start=True):
        if REDIS is None:
            pytest.skip("redis-server not installed (Debian package redis-server; "
                        ".ci/run installs it)")
        directory = tmp_path / f"redis-{len(made)}"
        directory.mkdir()
        server = RedisServer(directory, port, password, tls)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in made:
        server.stop()


# -- a real HAProxy (PROXY protocol in front of sockserv nodes) ------------------------

HAPROXY = shutil.which("haproxy", path=os.pathsep.join(
    filter(None, [os.environ.get("PATH"), "/usr/sbin", "/usr/local/sbin"])))


def stop_process(proc, timeout=10.0):
    """End a subprocess this test started (None or gone: nothing to do): SIGTERM by
    its PID, then SIGKILL if it is still there after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def listening(port, host="127.0.0.1"):
    """True when a TCP socket listens on ``host:port`` (IPv4), read from /proc/net/tcp:
    no connection is made, so nothing is relayed to a backend by asking."""
    # the kernel prints the address's 4 bytes as one integer in host byte order
    wanted = f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(fields[1] == wanted and fields[3] == "0A"  # TCP_LISTEN
                   for fields in (line.split() for line in f) if len(fields) > 3)


class HAProxy:
    """A real ``haproxy`` in tcp mode: one frontend on a free loopback port (``port``),
    round robin over ``backends`` (ports on 127.0.0.1, or ``(host, port)``), named
    ``s0``, ``s1``... Each server line gets ``server_options`` (default: the PROXY
    protocol v2 header and a health check every 100 ms, which HAProxy 2.6 sends as
    a v2 LOCAL header). ``proc`` is the process (started and stopped by PID);
    :meth:`server_status` reads the servers' states (``UP``, ``DOWN``) from its
    stats socket. The config and log are in ``directory``. With
    ``frontend_per_server``, each server also has a frontend of its own, on port
    ``server_ports[i]``, that relays to it alone (so a test knows where a client
    lands)."""

    def __init__(self, directory, backends, *,
                 server_options="send-proxy-v2 check inter 100ms fall 2 rise 1",
                 timeout="30s", frontend_per_server=False):
        self.directory = Path(directory)
        self.backends = [b if isinstance(b, tuple) else ("127.0.0.1", b) for b in backends]
        self.server_options = server_options
        self.timeout = timeout
        self.port = free_port()
        self.server_ports = [free_port() for _ in self.backends] if frontend_per_server else []
        self.proc = None
        self.config_path = self.directory / "haproxy.cfg"
        self.log_path = self.directory / "haproxy.log"
        self.stats_path = self.directory / "haproxy.sock"

    def config_text(self):
        servers = "\n".join(f"    server s{i} {host}:{port} {self.server_options}"
                            for i, (host, port) in enumerate(self.backends))
        singles = "".join(f"""\
frontend to_s{i}
    bind 127.0.0.1:{own}
    default_backend only_s{i}
backend only_s{i}
    server s{i} {self.backends[i][0]}:{self.backends[i][1]} {self.server_options}
""" for i, own in enumerate(self.server_ports))
        return f"""\
global
    maxconn 4096
    stats socket {self.stats_path} mode 600 level admin
defaults
    mode tcp
    option redispatch
    retries 3
    timeout connect 2s
    timeout client {self.timeout}
    timeout server {self.timeout}
frontend sockserv
    bind 127.0.0.1:{self.port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
{singles}"""

    def start(self, timeout=10.0):
        """Write the config, start ``haproxy -f CFG -db``, wait until its port listens."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([HAPROXY, "-f", str(self.config_path), "-db"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.proc.returncode}): "
                                     f"{self.log_path.read_text(errors='replace')[-2000:]}")
            return all(listening(port) for port in [self.port, *self.server_ports])

        wait_for(up, timeout, what=f"haproxy listening on port {self.port}")
        return self

    def stop(self):
        """SIGTERM (by PID) and wait; SIGKILL if it does not go."""
        stop_process(self.proc)

    def command(self, line):
        """One command on the stats socket (e.g. ``show stat``); its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            return recv_until_eof(sock).decode()

    def server_status(self):
        """``{"s0": "UP", "s1": "DOWN", ...}`` from ``show stat``."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row["status"].split()[0] for row in rows
                if row.get("pxname") == "nodes" and row["svname"] not in ("FRONTEND", "BACKEND")}


@pytest.fixture
def haproxy():
    """``haproxy(backends, server_options=..., timeout="30s", frontend_per_server=False,
    start=True)``: an HAProxy (skips without haproxy) in front of ``backends``, stopped
    at the end; ``.port`` is its frontend, ``.proc`` its process. Its files are in a
    short directory of /tmp (the stats socket's path must fit the 107 bytes of a Unix
    socket address)."""
    import tempfile

    made = []

    def make(backends, *, start=True, **options):
        if HAPROXY is None:
            pytest.skip("haproxy not installed (Debian package haproxy; .ci/run installs it)")
        proxy = HAProxy(tempfile.mkdtemp(prefix="haproxy-", dir="/tmp"), backends, **options)
        made.append(proxy)
        if start:
            proxy.start()
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
        shutil.rmtree(proxy.directory, ignore_errors=True)
