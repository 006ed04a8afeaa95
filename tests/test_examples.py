"""The examples in examples/ run as their docstrings say, with real clients."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest

from .conftest import (
    ENGINE_NAMES,
    ROOT,
    CLIServer,
    connect,
    read_line,
    recv_exactly,
    recv_until_eof,
    udp_client,
)

EXAMPLES = ROOT / "examples"


# -- upper.py: a LineHandler ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_upper_over_tcp_on_every_engine(cli, engine):
    server = cli("serve", "upper:Upper", "--port", "0", "--engine", engine, cwd=str(EXAMPLES))
    with connect(server.wait_serving()) as sock:
        sock.sendall(b"hello\r\nwor")
        assert recv_exactly(sock, 6) == b"HELLO\n"
        sock.sendall(b"ld\nlast")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"WORLD\nLAST\n"


def test_upper_over_udp_and_as_a_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSERV_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "upper.py"), "--port", "0",
                             "--proto", "udp"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        for line in proc.stderr:
            if "serving upper:Upper on udp" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        else:
            raise AssertionError(f"no serving line (exit {proc.wait()})")
        with udp_client() as sock:
            sock.sendto(b"one\ntwo", ("127.0.0.1", port))  # a datagram is a whole message
            assert sock.recv(100) == b"ONE\n"
            assert sock.recv(100) == b"TWO\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        proc.stderr.close()


# -- chat.py: a chat room on the push hub -------------------------------------------------------


def join(port, nick):
    sock = connect(port)
    assert read_line(sock) == b"+OK welcome, send your nick\n"
    sock.sendall(nick + b"\n")
    assert read_line(sock) == b"MSG room * " + nick + b" joined\n"
    return sock


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_chat_room_on_every_engine(cli, engine):
    server = cli("serve", "chat:ChatRoom", "--port", "0", "--engine", engine,
                 cwd=str(EXAMPLES))
    port = server.wait_serving()
    alice = join(port, b"alice")
    bob = join(port, b"bob")
    assert read_line(alice) == b"MSG room * bob joined\n"
    with connect(port) as nobody:  # a bad nick is refused, the connection stays
        read_line(nobody)
        nobody.sendall(b"not a nick\n")
        assert read_line(nobody) == b"-ERR a nick is 1-32 letters, digits, _ or -\n"
    alice.sendall(b"hello\n\nhow are you?\n")  # an empty line says nothing
    for member in (alice, bob):
        assert read_line(member) == b"MSG room alice: hello\n"
        assert read_line(member) == b"MSG room alice: how are you?\n"
    bob.sendall(b"fine\n")
    assert read_line(alice) == b"MSG room bob: fine\n"
    bob.close()
    assert read_line(alice) == b"MSG room * bob left\n"
    alice.close()


# -- telemetry.py: a UDP receiver ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ["select", "thread"])
def test_telemetry_receiver_keeps_statistics_per_name(cli, engine):
    server = cli("serve", "telemetry:Telemetry", "--proto", "udp", "--port", "0",
                 "--engine", engine, cwd=str(EXAMPLES))
    address = ("127.0.0.1", server.wait_serving())
    with udp_client() as a, udp_client() as b:
        b.sendto(b"cpu.load 1\r\nrequests 7", address)
        b.sendto(b"no-value\nbad/name 3\ntemp nan\n", address)  # three malformed lines
        b.sendto(b"STATS requests", address)  # one peer's datagrams are taken in order
        assert b.recv(65536) == b"requests count=1 min=7 max=7 mean=7 last=7\nerrors=3\n"
        a.sendto(b"cpu.load 0.5\ncpu.load 1.5\n", address)  # another sender, the same stats
        a.sendto(b"STATS", address)
        assert a.recv(65536) == (b"cpu.load count=3 min=0.5 max=1.5 mean=1 last=1.5\n"
                                 b"requests count=1 min=7 max=7 mean=7 last=7\n"
                                 b"errors=3\n")


# -- legacy.py: an old socketserver handler ---------------------------------------------------


class ScriptServer(CLIServer):
    """An example script run as ``python examples/NAME.py``; the rest (stderr lines in
    a queue, wait_line, signal, stop) as for a `python -m sockserv` subprocess."""

    def __init__(self, script, env):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSERV_")}
        full_env.update(env, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / script)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=full_env)
        self.lines = queue.Queue()
        self.seen = []
        self.port = None
        threading.Thread(target=self._pump, daemon=True).start()


@pytest.fixture
def script():
    started = []

    def start(name, **env):
        server = ScriptServer(name, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_legacy_handler_runs_unchanged_with_config_and_graceful_shutdown(script):
    server = script("legacy.py", SOCKSERV_PORT="0", SOCKSERV_SHUTDOWN_TIMEOUT="5")
    line = server.wait_line(r"serving key-value on tcp 127\.0\.0\.1:\d+")
    port = int(line.rsplit(":", 1)[1])
    with connect(port) as a, connect(port) as b:
        a.sendall(b"SET colour blue\n")
        assert read_line(a) == b"OK\n"
        b.sendall(b"GET colour\nHELLO\n")
        assert read_line(b) == b"blue\n"
        assert read_line(b) == b"ERR unknown command\n"
        server.signal(signal.SIGTERM)  # both clients connected: they see EOF, not a reset
        assert recv_until_eof(a) == b"" and recv_until_eof(b) == b""
    assert server.wait() == 0
    server.wait_line(r"stopped")


def test_legacy_bad_config_exits_2_in_one_line(script):
    server = script("legacy.py", SOCKSERV_PORT="http")
    assert server.wait() == 2
    assert server.wait_line("legacy: error") == (
        "legacy: error: port: 'http' is not an integer (from SOCKSERV_PORT)")


def test_legacy_handler_also_runs_under_sockserv_serve(cli):
    server = cli("serve", "legacy:KeyValue", "--port", "0", "--engine", "fork",
                 cwd=str(EXAMPLES))
    with connect(server.wait_serving()) as sock:
        sock.sendall(b"SET k v\nGET k\n")
        assert read_line(sock) == b"OK\n"
        assert read_line(sock) == b"v\n"
