"""systemd deployment: socket activation through the real systemd-socket-activate,
the sd_notify protocol on a test-owned NOTIFY_SOCKET, the watchdog, journald log
lines, privilege drop, the pidfile, and the unit files in examples/systemd/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from sockserv import Config, EchoHandler, systemd
from sockserv.engines import ENGINES
from sockserv.log import JournalFormatter

from .conftest import (
    ENGINE_NAMES,
    ROOT,
    children_of,
    connect,
    free_port,
    recv_exactly,
    recv_until_eof,
    run_cli,
    udp_client,
    wait_for,
)

ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
UNITS = ROOT / "examples" / "systemd"
CLUSTER_UNITS = ROOT / "examples" / "cluster"  # the push nodes of the cluster example
needs_activate = pytest.mark.skipif(not ACTIVATE, reason="systemd-socket-activate not installed "
                                    "(Debian package systemd; .ci/run installs it)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


# -- helpers ---------------------------------------------------------------------------


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def activate(cli, listen, *args, options=(), env=None):
    """``systemd-socket-activate -l ADDR... OPTIONS python -m sockserv ARGS``, once it
    listens. ``listen``: addresses, a number for that many free loopback ports (a port
    taken meanwhile by someone else is retried), or a path. Returns (process, addresses)."""
    # systemd-socket-activate passes on only TERM, PATH, USER and HOME (and LISTEN_*):
    # hand it the rest (PYTHONPATH, coverage's variables, the test's own) with -E NAME.
    names = {*os.environ, *(env or {}), "PYTHONPATH"}
    options = [*options, *[f"--setenv={name}" for name in sorted(names)
                           if not name.startswith(("SOCKSERV_", "LISTEN_"))]]
    for _ in range(5):
        if isinstance(listen, int):
            finder = free_udp_port if "--datagram" in options else free_port
            addresses = [f"127.0.0.1:{finder()}" for _ in range(listen)]
        else:
            addresses = list(listen)
        prefix = [ACTIVATE, *[f"--listen={a}" for a in addresses], *options]
        server = cli(*args, env=env, prefix=prefix)
        try:
            server.wait_line(rf"Listening on .* as {2 + len(addresses)}\.")
        except AssertionError:
            if any("in use" in line for line in server.seen):
                server.stop()
                continue
            raise
        return server, addresses
    raise AssertionError("no free ports for systemd-socket-activate")


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def echo_round_trip(port, payload=b"hello\n"):
    with connect(port) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""


class NotifySocket:
    """A test-owned NOTIFY_SOCKET (a path, or an @abstract name) and what arrives on it."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if address.startswith("@"):
            self.sock.bind("\0" + address[1:])
        else:
            self.sock.bind(address)
        self.env = {"NOTIFY_SOCKET": address}
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout):
        """The next message as a dict of fields (in order), or None after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key, timeout=10.0):
        """The next message carrying ``key``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key} in {timeout}s; got {self.messages}")

    def drain(self):
        """Drop what is queued now; returns how many messages that was."""
        count = 0
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(65536)
                count += 1
        except BlockingIOError:
            return count

    def close(self):
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    address = (str(tmp_path / "notify.sock") if request.param == "path"
               else f"@sockserv-test-{uuid.uuid4().hex}")
    listener = NotifySocket(address)
    yield listener
    listener.close()


@pytest.fixture
def notify_path(tmp_path):
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def proc_state(pid):
    stat = open(f"/proc/{pid}/stat").read()
    return stat[stat.rindex(")") + 2]


def catches_sigterm(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


def proc_ids(pid):
    """Uid, Gid (real, effective, saved, fs) and Groups lines of /proc/PID/status."""
    found = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            found[key] = value.split()
    return found


# -- socket activation through systemd-socket-activate -----------------------------------


ENV_REPORT = textwrap.dedent("""
    import json, os
    import sockserv

    class Report(sockserv.Handler):
        '''Answers with what the server process sees of socket activation.'''

        def connection_made(self):
            fd = self.conn.server.socket.fileno()
            env = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
            report = {"env": env, "inheritable": os.get_inheritable(fd), "pid": os.getpid()}
            self.conn.write(json.dumps(report).encode() + b"\\n")
            self.conn.close()
""")


@needs_activate
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tcp_socket_activation_serves_the_passed_socket(cli, engine):
    server, (address,) = activate(cli, 1, "echo", "--engine", engine, options=["--fdname=echo"])
    port = port_of(address)
    echo_round_trip(port)  # the first connection starts sockserv, which adopts fd 3
    server.wait_line(rf"using the socket passed by systemd: fd 3 \(echo\): tcp {address}$")
    line = server.wait_line(r"serving echo on ")
    assert f"tcp {address} (engine {engine}, pid {server.proc.pid})" in line  # exec'd, no bind
    echo_round_trip(port)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_activate
def test_activated_server_clears_the_variables_and_sets_cloexec(cli, tmp_path):
    (tmp_path / "envreport.py").write_text(ENV_REPORT)
    server, (address,) = activate(cli, 1, "serve", "envreport:Report",
                                  env={"PYTHONPATH": str(tmp_path)})
    with connect(port_of(address)) as sock:
        report = json.loads(recv_until_eof(sock))
    assert report == {"env": {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None},
                      "inheritable": False, "pid": server.proc.pid}


@needs_activate
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_udp_socket_activation(cli, engine):
    server, (address,) = activate(cli, 1, "echo", "--engine", engine, options=["--datagram"])
    with udp_client() as sock:
        sock.sendto(b"datagram", ("127.0.0.1", port_of(address)))  # starts sockserv
        assert sock.recv(100) == b"datagram"
    # the socket's type decides: proto udp without --proto udp
    server.wait_line(rf"serving echo on udp {address} ")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_activate
def test_workers_share_the_passed_socket_and_notify(cli, notify_path):
    server, (address,) = activate(cli, 1, "echo", "--workers", "2", env=notify_path.env)
    echo_round_trip(port_of(address))  # starts the supervisor, which adopts fd 3
    ready = notify_path.wait_for("READY")  # once both workers serve
    assert ready["STATUS"] == f"echo on tcp {address}: 2 workers"
    assert ready["MAINPID"] == str(server.proc.pid)
    assert len(children_of(server.proc.pid)) == 2
    old = {pid for pid, _ in children_of(server.proc.pid)}
    server.signal(signal.SIGHUP)
    assert "MONOTONIC_USEC" in notify_path.wait_for("RELOADING")
    notify_path.wait_for("READY")

    def replaced():  # two new workers, each past installing its SIGTERM handler
        new = {pid for pid, _ in children_of(server.proc.pid)}
        return len(new) == 2 and not new & old and all(catches_sigterm(pid) for pid in new)

    wait_for(replaced, what="the workers replaced")
    echo_round_trip(port_of(address))
    server.signal(signal.SIGTERM)
    notify_path.wait_for("STOPPING")
    assert server.wait() == 0
    assert not any("cannot bind" in line for line in server.seen)


@needs_activate
def test_unix_socket_activation_leaves_the_path_alone(cli, tmp_path):
    path = str(tmp_path / "echo.sock")
    server, _ = activate(cli, [path], "echo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"unix\n")
        assert recv_exactly(sock, 5) == b"unix\n"
    server.wait_line(rf"serving echo on unix {re.escape(path)} ")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert os.path.exists(path)  # an inherited listener is never unlinked


@needs_activate
@pytest.mark.parametrize("options", [["--accept"], ["--accept", "--fdname=connection"],
                                     ["--inetd", "--accept"]],
                         ids=["accept", "accept-named-connection", "inetd-stdin"])
@pytest.mark.parametrize("engine", ["select", "fork"])
def test_accept_yes_serves_one_connection_per_process_and_exits_0(cli, options, engine):
    server, (address,) = activate(cli, 1, "echo", "--engine", engine, options=options)
    port = port_of(address)
    for _ in range(2):
        with connect(port) as sock:
            sock.sendall(b"one connection\n")
            assert recv_exactly(sock, 15) == b"one connection\n"
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        # systemd-socket-activate reports each child's exit status
        died = server.wait_line(r"Child \d+ died with code")
        assert died.endswith("code 0"), died
        server.seen.remove(died)
    assert any("serving echo on one connection from 127.0.0.1:" in line for line in server.seen)


@needs_activate
def test_accept_yes_connection_ends_on_sigterm(cli):
    server, (address,) = activate(cli, 1, "echo", options=["--accept"])
    with connect(port_of(address)) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        line = server.wait_line(r"serving echo on one connection .*pid (\d+)")
        child = int(re.search(r"pid (\d+)", line).group(1))
        os.kill(child, signal.SIGTERM)  # input ends: the echo handler flushes and closes
        assert recv_until_eof(sock) == b""
    assert server.wait_line(r"Child \d+ died with code").endswith("code 0")


@needs_activate
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_inetd_listening_socket_on_stdin(cli, proto):
    options = ["--inetd"] + (["--datagram"] if proto == "udp" else [])
    server, (address,) = activate(cli, 1, "echo", options=options)
    if proto == "tcp":
        echo_round_trip(port_of(address))
    else:
        with udp_client() as sock:
            sock.sendto(b"datagram", ("127.0.0.1", port_of(address)))
            assert sock.recv(100) == b"datagram"
    server.wait_line(rf"using the socket on stdin \(inetd\): fd 0 \(stdin\): {proto} {address}$")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_activate
def test_ipv6_socket_activation(cli):
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        port = probe.getsockname()[1]
    server, _ = activate(cli, [f"[::1]:{port}"], "echo")
    with socket.create_connection(("::1", port), timeout=10) as sock:
        sock.sendall(b"six\n")
        assert recv_exactly(sock, 4) == b"six\n"
    server.wait_line(rf"serving echo on tcp \[::1\]:{port} ")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_activate
def test_named_fds_choose_the_socket_to_serve(cli):
    server, (other, mine) = activate(cli, 2, "echo", options=["--fdname=other:echo"])
    echo_round_trip(port_of(mine))
    server.wait_line(r"not serving fd 3 \(other\)")
    server.wait_line(rf"serving echo on tcp {mine} ")
    with pytest.raises(ConnectionRefusedError):  # our copy of the other one is closed
        socket.create_connection(("127.0.0.1", port_of(other)), timeout=5).close()
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_activate
def test_fds_named_after_the_proto(cli):
    server, (tcp_one, _) = activate(cli, 2, "echo", options=["--fdname=tcp:udp"])
    echo_round_trip(port_of(tcp_one))
    server.wait_line(rf"serving echo on tcp {tcp_one} ")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_activate
def test_ambiguous_sockets_exit_1_with_one_line(cli):
    server, (first, _) = activate(cli, 2, "echo")
    with connect(port_of(first)) as sock:  # starts sockserv, which cannot choose
        assert server.wait() == 1
        sock.close()
    with pytest.raises(AssertionError, match="server exited"):
        server.wait_line(r"^read every line$")
    errors = [line for line in server.seen if line.startswith("sockserv: error:")]
    assert len(errors) == 1
    assert "2 of the passed sockets could serve echo over tcp" in errors[0]
    assert "FileDescriptorName=echo" in errors[0]
    assert not any("Traceback" in line for line in server.seen)


def test_anonymous_socketpair_on_stdin_is_not_a_connection(cli):
    """What ssh gives a command as stdin: sockserv must bind as usual, not serve it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        server = cli("echo", "--port", "0", stdin=theirs)
        port = server.wait_serving()
        echo_round_trip(port)


def test_listen_fds_ignores_another_process_and_unsets():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert systemd.listen_fds(env) == []
    assert env == {"OTHER": "kept"}


@pytest.mark.parametrize("env, fragment", [
    ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
    ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, "names 1 socket(s) but LISTEN_FDS=2"),
])
def test_listen_fds_malformed(env, fragment):
    env["LISTEN_PID"] = str(os.getpid())
    with pytest.raises(systemd.ActivationError, match=re.escape(fragment)):
        systemd.listen_fds(env, unset=False)


def passed(name, kind=socket.SOCK_STREAM):
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return systemd.PassedSocket(sock.fileno(), name, sock, kind == socket.SOCK_STREAM, False)


@pytest.mark.parametrize("names, service, proto, chosen, proto_after", [
    ([("only", "udp")], "echo", "tcp", "only", "udp"),
    ([("a", "tcp"), ("echo", "tcp")], "echo", "tcp", "echo", "tcp"),
    ([("x", "tcp"), ("x", "udp")], "echo", "udp", "x/udp", "udp"),
    ([("tcp", "tcp"), ("udp", "tcp")], "echo", "udp", "udp", "tcp"),
    ([("myapp.handlers.Upper", "tcp"), ("b", "tcp")], "myapp.handlers:Upper", "tcp",
     "myapp.handlers.Upper", "tcp"),
    ([("echo", "tcp"), ("echo", "udp"), ("push", "tcp")], "echo", "udp", "echo/udp", "udp"),
])
def test_naming_rule(names, service, proto, chosen, proto_after):
    kinds = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
    socks = [passed(name, kinds[kind]) for name, kind in names]
    try:
        pick, config = systemd.choose_listener(socks, Config(service=service, proto=proto))
        want_name, _, want_kind = chosen.partition("/")
        assert pick.name == want_name
        assert pick.proto == (want_kind or pick.proto)
        assert config.proto == proto_after
        assert config.sources["proto"] == f"socket fd {pick.fd} from systemd"
        assert pick.sock.fileno() != -1
        assert all(p.sock.fileno() == -1 for p in socks if p is not pick)  # closed
    finally:
        for p in socks:
            p.sock.close()


def test_from_socket_keeps_a_listening_sockets_backlog(serve):
    listener = socket.create_server(("127.0.0.1", 0), backlog=7)
    port = listener.getsockname()[1]
    server = ENGINES["select", "tcp"].from_socket(listener, EchoHandler,
                                                  config=Config(port=0, backlog=1024))
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=10).stdout if shutil.which("ss") else None
        if out is not None:
            assert out.split()[2] == "7", out  # Send-Q of a listener is its backlog
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        echo_round_trip(port)
    finally:
        server.shutdown()
        server.server_close()
    assert listener.fileno() == -1


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_from_socket_listens_on_a_bound_socket(engine):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = ENGINES[engine, "tcp"].from_socket(sock, EchoHandler, config=Config(port=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        echo_round_trip(port)
        assert server.describe() == f"tcp 127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    with pytest.raises(ValueError, match="needs a datagram socket"):
        ENGINES[engine, "udp"].from_socket(socket.socket(), EchoHandler)


# -- sd_notify ---------------------------------------------------------------------------


def kinds(messages):
    """The state changes, in order (STATUS-only refreshes and pings left out)."""
    found = []
    for fields in messages:
        for key in ("READY", "RELOADING", "STOPPING"):
            if key in fields:
                found.append(key)
    return found


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_notify_start_reload_stop(cli, notify_socket, tmp_path, engine):
    conf = tmp_path / "echo.toml"
    conf.write_text("max_line = 100\n")
    server = cli("echo", "--port", "0", "--engine", engine, "--config", str(conf),
                 env=notify_socket.env)
    port = server.wait_serving()
    ready = notify_socket.wait_for("READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(server.proc.pid)
    assert ready["STATUS"].startswith(f"echo on tcp 127.0.0.1:{port}: 0 open, 0 served")

    conf.write_text("max_line = 5\n")
    before = systemd.monotonic_usec()
    server.signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING")
    after = systemd.monotonic_usec()
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after  # the same clock, in µs
    assert "reload failed" not in notify_socket.wait_for("READY")["STATUS"]
    server.wait_line(r"reloaded config \(changed: max_line\)")

    conf.write_text("max_line = -1\n")
    server.signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING")
    status = notify_socket.wait_for("READY")["STATUS"]
    assert "; reload failed: max_line: -1 is out of range" in status

    server.signal(signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING")
    assert stopping["STATUS"] == "stopping: closing 0 connection(s)"
    assert server.wait() == 0
    assert kinds(notify_socket.messages) == ["READY", "RELOADING", "READY", "RELOADING", "READY",
                                             "STOPPING"]
    assert all("STATUS" in m for m in notify_socket.messages if "WATCHDOG" not in m)


def test_no_notify_socket_is_a_no_op():
    assert systemd.notify("READY=1", environ={}) is False
    assert not systemd.Notifier({}).enabled
    assert not systemd.Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_notify_to_a_missing_socket_does_not_raise(tmp_path, caplog):
    notifier = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.send("READY=1") is False
    assert notifier.send("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1  # once


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_status_refreshes_with_connections_and_subscribers(serve, notify_path, engine):
    server = serve(engine, EchoHandler)

    class Hub:
        def subscriber_count(self):
            return 3

    assert systemd._subscribers(server) is None  # an echo server's hub has nobody
    service = systemd.Service(server, environ=dict(notify_path.env), status_interval=0.05)
    server.call_soon_threadsafe(service.start)
    assert notify_path.wait_for("READY")["STATUS"].endswith(": 0 open, 0 served")
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"x")
        recv_exactly(sock, 1)
        while "1 open, 1 served" not in notify_path.wait_for("STATUS")["STATUS"]:
            pass
        server.hub = Hub()
        while ", 3 subscribers" not in notify_path.wait_for("STATUS")["STATUS"]:
            pass


# -- watchdog ---------------------------------------------------------------------------


def count_pings(listener, seconds):
    """WATCHDOG=1 messages received during ``seconds`` (a bounded window)."""
    deadline = time.monotonic() + seconds
    count = 0
    while (left := deadline - time.monotonic()) > 0:
        fields = listener.receive(left)
        if fields is not None and "WATCHDOG" in fields:
            count += 1
    return count


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_watchdog_pings_and_stops_when_the_process_stops(cli, notify_path, engine):
    server = cli("echo", "--port", "0", "--engine", engine,
                 env={**notify_path.env, "WATCHDOG_USEC": "200000"})
    server.wait_serving()
    assert notify_path.wait_for("WATCHDOG")["WATCHDOG"] == "1"
    assert count_pings(notify_path, 1.0) >= 4  # every 0.1 s: about 10 in a second

    server.signal(signal.SIGSTOP)
    wait_for(lambda: proc_state(server.proc.pid) == "T", what="the server stopped")
    notify_path.drain()
    assert notify_path.receive(0.6) is None  # six intervals: nothing from a stopped loop

    server.signal(signal.SIGCONT)
    notify_path.wait_for("WATCHDOG", timeout=5)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_watchdog_of_another_pid_is_not_ours(cli, notify_path):
    server = cli("echo", "--port", "0", env={**notify_path.env, "WATCHDOG_USEC": "200000",
                                             "WATCHDOG_PID": "1"})
    server.wait_serving()
    notify_path.wait_for("READY")
    assert count_pings(notify_path, 0.6) == 0


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_hung_serve_loop_stops_the_pings(serve, notify_path, engine):
    server = serve(engine, EchoHandler)
    env = {**notify_path.env, "WATCHDOG_USEC": "100000"}
    service = systemd.Service(server, environ=env)
    assert env["WATCHDOG_PID"] == str(os.getpid())
    server.call_soon_threadsafe(service.start, False)
    notify_path.wait_for("WATCHDOG")

    hung, release = threading.Event(), threading.Event()

    def hang():
        hung.set()
        release.wait(10)

    server.call_soon_threadsafe(hang)
    assert hung.wait(5)
    notify_path.drain()
    try:
        assert count_pings(notify_path, 0.5) == 0  # other threads run; the loop does not
    finally:
        release.set()
    notify_path.wait_for("WATCHDOG", timeout=5)

    unhealthy = threading.Event()

    def fail_liveness_check():  # in the loop, so no ping is on its way once it has run
        server.healthy = lambda: False
        unhealthy.set()

    server.call_soon_threadsafe(fail_liveness_check)
    assert unhealthy.wait(5)
    notify_path.drain()
    assert count_pings(notify_path, 0.5) == 0  # the liveness check fails: no pings either


def test_watchdog_usec_rules(monkeypatch):
    pid = str(os.getpid())
    assert systemd.watchdog_usec({}) is None
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "x"}) is None
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "5000000"}) == 5000000
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": pid}) == 5000000
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}) is None


# -- journald -----------------------------------------------------------------------------


def run_with_stderr_pipe(args, journal):
    """Start `python -m sockserv ARGS` with stderr on a pipe (JOURNAL_STREAM naming it
    if ``journal``); returns the lines up to the "serving" one, then stops it."""
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKSERV_", "JOURNAL_"))}
    env["PYTHONPATH"] = str(ROOT)
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    else:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # someone else's stream
    proc = subprocess.Popen([sys.executable, "-m", "sockserv", *args], stderr=write_end,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(write_end)
    lines = []
    try:
        with os.fdopen(read_end) as stream:
            for line in stream:
                lines.append(line.rstrip("\n"))
                if "serving" in line:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    return lines


def test_journal_lines_carry_priorities_and_no_timestamps():
    lines = run_with_stderr_pipe(["echo", "--port", "0", "--allow-root"], journal=True)
    assert re.fullmatch(r"<6>serving echo on tcp 127\.0\.0\.1:\d+ \(engine \w+, pid \d+\)",
                        lines[-1]), lines
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines


def test_plain_lines_elsewhere():
    lines = run_with_stderr_pipe(["echo", "--port", "0", "--allow-root"], journal=False)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ sockserv\[\d+\] INFO serving",
                    lines[-1]), lines


def test_journal_formatter_prefixes_every_line():
    import logging

    record = logging.LogRecord("sockserv", logging.WARNING, __file__, 1, "two\nlines", (), None)
    assert JournalFormatter("%(message)s").format(record) == "<4>two\n<4>lines"
    record.levelno = 25  # between INFO and WARNING: INFO's priority
    assert JournalFormatter("%(message)s").format(record) == "<6>two\n<6>lines"


# -- privileges and the pidfile -----------------------------------------------------------


@needs_root
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_user_and_group_are_dropped_after_binding(cli, engine):
    server = cli("echo", "--port", "0", "--engine", engine, "--user", "nobody",
                 "--group", "nogroup")
    port = server.wait_serving()
    server.wait_line(r"running as user nobody \(uid 65534\), group nogroup \(gid 65534\)")
    with connect(port) as sock:  # handlers (threads, children) run as nobody too
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        pids = [server.proc.pid] + [pid for pid, _ in children_of(server.proc.pid)]
        for pid in pids:
            ids = proc_ids(pid)
            assert ids["Uid"] == ["65534"] * 4, ids
            assert ids["Gid"] == ["65534"] * 4, ids
            assert ids["Groups"] == [], ids  # supplementary groups cleared
    assert not any("running handlers as root" in line for line in server.seen)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_root
def test_root_without_user_warns_by_default_and_refuses_when_told(cli):
    server = cli("echo", "--port", "0")
    server.wait_serving()
    server.wait_line(r"WARNING running handlers as root: set user")
    result = run_cli("echo", "--port", "0", "--no-allow-root")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sockserv: error: allow_root: false (from --no-allow-root) refuses to run handlers as "
        "root; set user (e.g. user = \"nobody\") or allow_root = true"]
    result = run_cli("echo", "--port", "0", env={"SOCKSERV_ALLOW_ROOT": "no"})
    assert result.returncode == 2
    assert "allow_root: false (from SOCKSERV_ALLOW_ROOT) refuses" in result.stderr
    quiet = cli("echo", "--port", "0", "--allow-root")
    quiet.wait_serving()
    assert not any("running handlers as root" in line for line in quiet.seen)


def test_unknown_user_is_a_config_error():
    result = run_cli("echo", "--user", "no-such-user-xyz")
    assert result.returncode == 2
    assert result.stderr == "sockserv: error: user: no such user 'no-such-user-xyz' " \
                            "(from --user)\n"


@needs_root
def test_switching_users_without_root_exits_1():
    result = subprocess.run(  # python3 from PATH: one that the user nobody may run
        ["python3", "-m", "sockserv", "echo", "--port", "0", "--user", "root"],
        capture_output=True, text=True, timeout=20, user=65534, group=65534, cwd="/",
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]})
    assert result.returncode == 1
    assert result.stderr == "sockserv: error: user: switching to root needs root " \
                            "(running as uid 65534) (from --user)\n"


@pytest.fixture
def shared_dir():
    """A directory that the user nobody can reach and write, outside pytest's tmp (0700)."""
    path = tempfile.mkdtemp(prefix="sockserv-test-", dir="/tmp")
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("user", [[], ["--user", "nobody"]], ids=["same-user", "nobody"])
def test_pidfile_is_written_and_removed(cli, shared_dir, user):
    if user and os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    pidfile = os.path.join(shared_dir, "echo.pid")
    server = cli("echo", "--port", "0", "--pidfile", pidfile, *user)
    server.wait_serving()
    assert open(pidfile).read() == f"{server.proc.pid}\n"
    assert os.listdir(shared_dir) == ["echo.pid"]  # no temporary file left behind
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not os.path.exists(pidfile)
    assert not any("cannot remove" in line for line in server.seen)


def test_pidfile_of_a_running_server_is_refused_and_a_stale_one_replaced(cli, shared_dir):
    pidfile = os.path.join(shared_dir, "echo.pid")
    first = cli("echo", "--port", "0", "--pidfile", pidfile)
    first.wait_serving()
    result = run_cli("echo", "--port", "0", "--pidfile", pidfile)
    assert result.returncode == 1
    assert result.stderr == (f"sockserv: error: pidfile: {pidfile} names pid "
                             f"{first.proc.pid}, a running sockserv\n")
    first.signal(signal.SIGKILL)  # leaves a stale pidfile behind
    first.wait()
    assert os.path.exists(pidfile)
    second = cli("echo", "--port", "0", "--pidfile", pidfile)
    second.wait_serving()
    assert open(pidfile).read() == f"{second.proc.pid}\n"


# -- unit files ---------------------------------------------------------------------------


UNIT_GROUPS = [
    ["sockserv-echo.socket", "sockserv-echo.service"],
    ["sockserv-push.service"],
    ["sockserv@.service"],
    ["sockserv-echo-inetd.socket", "sockserv-echo-inetd@.service"],
]
CLUSTER_UNIT_GROUPS = [["sockserv-push@.service"]]
# (directory, units verified together), for every unit file shipped
ALL_UNIT_GROUPS = [(UNITS, group) for group in UNIT_GROUPS] + \
    [(CLUSTER_UNITS, group) for group in CLUSTER_UNIT_GROUPS]
SERVICES = [directory / name for directory, group in ALL_UNIT_GROUPS for name in group
            if name.endswith(".service")]
needs_analyze = pytest.mark.skipif(not ANALYZE, reason="systemd-analyze not installed "
                                   "(Debian package systemd; .ci/run installs it)")


def systemd_version():
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, timeout=30)
    return int(re.match(r"systemd (\d+)", out.stdout).group(1))


@pytest.fixture(scope="module")
def man_path(tmp_path_factory):
    """A MANPATH where man(1) finds sockserv(1), as after installing the package, so
    verify can check the units' Documentation=man:sockserv(1)."""
    root = tmp_path_factory.mktemp("man")
    (root / "man1").mkdir()
    shutil.copy(ROOT / "man" / "sockserv.1", root / "man1" / "sockserv.1")
    return str(root)


@needs_analyze
@pytest.mark.timeout(120)
@pytest.mark.parametrize("directory, group", ALL_UNIT_GROUPS,
                         ids=[f"{d.name}/{g[-1]}" for d, g in ALL_UNIT_GROUPS])
def test_units_pass_systemd_analyze_verify(directory, group, man_path):
    # Without man(1) verify cannot check Documentation=man:sockserv(1); the rest it can.
    man = [] if shutil.which("man") else ["--man=no"]
    result = subprocess.run([ANALYZE, "verify", *man, *[str(directory / name) for name in group]],
                            capture_output=True, text=True, timeout=100,
                            env={**os.environ, "MANPATH": man_path})
    complaints = result.stderr.splitlines()
    if systemd_version() < 253:  # Type=notify-reload arrived in systemd 253
        complaints = [line for line in complaints
                      if not line.endswith("Failed to parse service type, ignoring: "
                                           "notify-reload")]
    assert result.returncode == 0, result.stderr
    assert complaints == [], result.stderr


@needs_analyze
@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", SERVICES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_units_score_2_or_less_in_systemd_analyze_security(path):
    result = subprocess.run([ANALYZE, "security", "--offline=yes", str(path)],
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)[1])
    assert score <= 2.0, result.stdout


def test_units_run_sockserv_and_match_their_roles():
    text = {path.name: path.read_text() for path in UNITS.iterdir()}
    assert sorted(text) == sorted(name for group in UNIT_GROUPS for name in group)
    assert "Type=notify\n" in text["sockserv-echo.service"]
    assert "Type=notify-reload\n" in text["sockserv-push.service"]
    assert "WatchdogSec=" in text["sockserv-push.service"]
    assert "-m sockserv push" in text["sockserv-push.service"]
    assert "--config /etc/sockserv/%i.toml" in text["sockserv@.service"]
    assert "Accept=yes" in text["sockserv-echo-inetd.socket"]
    for name, body in text.items():
        if name.endswith(".service"):
            assert "ExecStart=/usr/bin/python3 -m sockserv " in body, name


def test_cluster_units_run_push_nodes_hardened_like_the_shipped_ones():
    units = {path.name: path.read_text() for path in CLUSTER_UNITS.iterdir()
             if path.suffix in (".service", ".socket")}
    assert sorted(units) == sorted(name for group in CLUSTER_UNIT_GROUPS for name in group)
    node = units["sockserv-push@.service"]
    assert "ExecStart=/usr/bin/python3 -m sockserv push --config /etc/sockserv/%i.toml\n" in node
    assert "Type=notify\n" in node and "WatchdogSec=" in node
    # A node serves its own subscribers while Redis is down: it must not need it.
    assert not re.search(r"^(Requires|BindsTo|Requisite)=", node, re.M)
    # The same hardening as the template it was made from.
    hardening = (UNITS / "sockserv@.service").read_text().split("# Hardening", 1)[1]
    assert node.split("# Hardening", 1)[1] == hardening
    assert sorted(p.stem for p in CLUSTER_UNITS.glob("node*.toml")) == ["node1", "node2"]
