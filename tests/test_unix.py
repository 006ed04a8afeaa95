"""Unix sockets on every engine (``unix = PATH``, stream; datagram with ``proto = udp``):
real clients (socat, Python sockets), stale socket files replaced, a live server's socket
never taken, ``unix_mode``, the file removed on a clean exit, workers."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading

import pytest

from sockserv import Config, EchoHandler, Handler, make_server
from sockserv.connection import format_address

from .conftest import ENGINE_NAMES, recv_exactly, recv_until_eof, run_cli, wait_for


@pytest.fixture
def sockdir():
    """A short directory for socket files (a Unix socket path has at most 107 bytes;
    pytest's tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="ss-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_client(path, timeout=10.0):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def dgram_client(directory, name="client.sock", timeout=5.0):
    """A datagram client bound to a path of its own: without one, no reply can reach it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.bind(os.path.join(directory, name))
    return sock


def round_trip(path, proto, directory, payload):
    """``payload`` to the server at ``path`` and back, over a stream or as a datagram."""
    if proto == "tcp":
        with unix_client(path) as sock:
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
    else:
        with dgram_client(directory) as sock:
            sock.sendto(payload, path)
            assert sock.recv(65536) == payload


def stale_socket(path, kind=socket.SOCK_STREAM):
    """A socket file as a server that died leaves it: bound, closed, not removed."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    if kind == socket.SOCK_STREAM:
        sock.listen()
    sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# -- serving, every engine ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_stream_echo_over_a_unix_socket(serve, sockdir, engine):
    path = os.path.join(sockdir, "echo.sock")
    server = serve(engine, EchoHandler, unix=path)
    assert server.address_family == socket.AF_UNIX
    assert server.describe() == f"unix {path}"
    data = os.urandom(300_000)
    with unix_client(path) as sock:
        def send_then_half_close():
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_then_half_close)
        sender.start()
        assert recv_until_eof(sock) == data
        sender.join(10)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_datagram_echo_over_a_unix_socket(serve, sockdir, engine):
    path = os.path.join(sockdir, "echo.sock")
    server = serve(engine, EchoHandler, proto="udp", unix=path)
    assert server.describe() == f"unixgram {path}"
    with dgram_client(sockdir, "a.sock") as a, dgram_client(sockdir, "b.sock") as b:
        for payload in (b"one", b"", os.urandom(60000)):
            a.sendto(payload, path)
            assert a.recv(65536) == payload
        b.sendto(b"from b", path)
        assert b.recv(100) == b"from b"


@pytest.mark.parametrize("engine", ["select", "thread"])  # fork: counted in the child
def test_an_unbound_datagram_client_is_served_but_gets_no_reply(serve, sockdir, engine):
    path = os.path.join(sockdir, "echo.sock")
    server = serve(engine, EchoHandler, proto="udp", unix=path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
        unbound.sendto(b"no way back", path)
    wait_for(lambda: server.stats.snapshot()["dropped"] == 1, what="the reply to be dropped")
    with dgram_client(sockdir) as bound:  # and the server goes on
        bound.sendto(b"ok", path)
        assert bound.recv(10) == b"ok"


class PeerName(Handler):
    """Answers the peer's address as the server sees it, then closes."""

    def connection_made(self):
        self.conn.write(format_address(self.conn.peer).encode() + b"\n")
        self.conn.close()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_unix_peers_are_an_empty_name_or_the_clients_path(serve, sockdir, engine):
    path = os.path.join(sockdir, "peer.sock")
    serve(engine, PeerName, unix=path, access_log=True)
    with unix_client(path) as sock:
        assert recv_until_eof(sock) == b"-\n"  # unnamed, as most clients are
    client_path = os.path.join(sockdir, "named-client.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.bind(client_path)
        sock.connect(path)
        assert recv_until_eof(sock) == client_path.encode() + b"\n"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_unix_mode_is_applied_and_the_file_removed_at_close(sockdir, engine, proto):
    path = os.path.join(sockdir, "mode.sock")
    for mode in (0o600, 0o660):
        server = make_server(Config(engine=engine, proto=proto, unix=path,
                                    unix_mode=format(mode, "o")), EchoHandler)
        try:
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == mode
        finally:
            server.server_close()
        assert not os.path.exists(path)


# -- stale files and live servers --------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_stale_socket_file_is_replaced(serve, sockdir, engine, proto, caplog):
    path = os.path.join(sockdir, "stale.sock")
    stale_socket(path, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    with caplog.at_level(logging.INFO, logger="sockserv"):
        serve(engine, EchoHandler, proto=proto, unix=path)
    assert f"removed the stale socket file {path}" in caplog.text
    round_trip(path, proto, sockdir, b"fresh\n")


def serving_unix(server, path):
    return server.wait_line(rf"serving echo on unix(gram)? {re.escape(path)} ")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_live_servers_socket_is_never_stolen(cli, sockdir, proto):
    path = os.path.join(sockdir, "live.sock")
    first = cli("echo", "--unix", path, "--proto", proto)
    serving_unix(first, path)
    inode = os.lstat(path).st_ino
    for engine in ENGINE_NAMES:
        second = run_cli("echo", "--unix", path, "--proto", proto, "--engine", engine)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1, lines
        kind = "unix" if proto == "tcp" else "unixgram"
        assert lines[0] == (f"sockserv: error: cannot bind {kind} {path}: another server is "
                            "listening on it (its socket is left alone)"), lines[0]
    assert os.lstat(path).st_ino == inode  # the first server's file, untouched
    round_trip(path, proto, sockdir, b"still mine\n")


def test_a_path_that_is_not_a_socket_is_left_alone(sockdir):
    path = os.path.join(sockdir, "precious.txt")
    with open(path, "w") as f:
        f.write("do not delete\n")
    result = run_cli("echo", "--unix", path)
    assert result.returncode == 1
    assert result.stderr == (f"sockserv: error: cannot bind unix {path}: the path exists and "
                             "is not a socket (left alone)\n")
    with open(path) as f:
        assert f.read() == "do not delete\n"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_cli_unix_socket_lifecycle_with_socat(cli, sockdir, engine):
    """A server killed with SIGKILL leaves its file; the next one replaces it, serves
    socat, and removes the file when it stops cleanly."""
    path = os.path.join(sockdir, "cli.sock")
    killed = cli("echo", "--unix", path, "--engine", engine)
    serving_unix(killed, path)
    killed.signal(signal.SIGKILL)
    killed.wait()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind
    server = cli("echo", "--unix", path, "--engine", engine, "--unix-mode", "600",
                 "--access-log")
    serving_unix(server, path)
    server.wait_line(rf"removed the stale socket file {re.escape(path)}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    if shutil.which("socat"):
        result = subprocess.run(["socat", "-t", "5", "-", f"UNIX-CONNECT:{path}"],
                                input=b"through socat\n", capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"through socat\n"
    with unix_client(path) as sock:
        sock.sendall(b"python\n")
        assert recv_exactly(sock, 7) == b"python\n"
    server.wait_line(r" INFO - in=7 out=7 ")  # the access log line of an unnamed peer
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not os.path.exists(path)
    assert not any("Traceback" in line for line in server.seen)


@pytest.mark.parametrize("engine", ["select", "thread"])  # fork takes no workers
def test_workers_share_one_unix_socket_and_the_supervisor_removes_it(cli, sockdir, engine):
    path = os.path.join(sockdir, "workers.sock")
    server = cli("echo", "--unix", path, "--workers", "2", "--engine", engine)
    server.wait_line(rf"supervisor \d+: 2 {engine} worker\(s\) on unix {re.escape(path)}")
    server.wait_line(r"supervisor \d+: 2 worker\(s\) serving")
    for i in range(6):
        with unix_client(path) as sock:
            sock.sendall(b"%d\n" % i)
            assert recv_exactly(sock, 2) == b"%d\n" % i
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not os.path.exists(path)


def test_workers_refuse_to_take_a_live_socket(cli, sockdir):
    path = os.path.join(sockdir, "live.sock")
    first = cli("echo", "--unix", path)
    serving_unix(first, path)
    result = run_cli("echo", "--unix", path, "--workers", "2")
    assert result.returncode == 1
    assert result.stderr.startswith(f"sockserv: error: cannot bind unix {path}: another "
                                    "server is listening on it")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("flags,expected", [
    (["--reuse-port", "--workers", "2"], "reuse_port: does not go with unix"),
    (["--unix-mode", "9"], "unix_mode: '9' is not a permission mode in octal"),
], ids=["reuse-port", "bad-mode"])
def test_unix_config_errors_exit_2(sockdir, flags, expected):
    result = run_cli("echo", "--unix", os.path.join(sockdir, "x.sock"), *flags)
    assert result.returncode == 2
    assert result.stderr.startswith(f"sockserv: error: {expected}"), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_unix_mode_without_unix_and_too_long_paths_are_config_errors():
    for flags, expected in ((["--unix-mode", "660"], "unix_mode: needs unix"),
                            (["--unix", "/tmp/" + "x" * 120], "unix: '/tmp/xxx")):
        result = run_cli("echo", *flags)
        assert result.returncode == 2
        assert result.stderr.startswith(f"sockserv: error: {expected}"), result.stderr


def test_the_file_of_a_server_that_replaced_ours_is_not_removed(sockdir):
    path = os.path.join(sockdir, "moved.sock")
    server = make_server(Config(unix=path), EchoHandler)
    os.unlink(path)  # someone removed ours and bound another server there
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    try:
        server.server_close()
        assert os.path.exists(path)
    finally:
        other.close()
