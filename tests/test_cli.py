"""`python -m sockserv` as users run it: real processes, real clients (nc, socat)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import textwrap

import pytest

from .conftest import (
    ENGINE_NAMES,
    connect,
    free_port,
    many_tcp_clients,
    recv_exactly,
    recv_until_eof,
    run_cli,
    udp_client,
    wait_for,
)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sockserv: error: "), lines
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("sockserv 0.")


def test_echo_help_lists_every_setting():
    from sockserv.config import SETTINGS

    result = run_cli("echo", "--help")
    assert result.returncode == 0
    for name in SETTINGS:
        if name != "service":
            assert "--" + name.replace("_", "-") in result.stdout


def test_print_config_shows_values_and_their_sources(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("max_line = 100\n")
    result = run_cli("echo", "--config", str(path), "--port", "9", "--print-config",
                     env={"SOCKSERV_ENGINE": "fork"})
    assert result.returncode == 0, result.stderr
    assert f"max_line = 100  # {path}" in result.stdout
    assert "port = 9  # --port" in result.stdout
    assert 'engine = "fork"  # SOCKSERV_ENGINE' in result.stdout
    assert 'host = "127.0.0.1"  # default' in result.stdout


@pytest.mark.parametrize("args, env, fragments", [
    (["--port", "70000"], {}, ["port: 70000 is out of range 0-65535 (from --port)"]),
    ([], {"SOCKSERV_PORT": "70000"}, ["(from SOCKSERV_PORT)"]),
    ([], {"SOCKSERV_PROT": "udp"}, ["unknown setting 'prot'", "did you mean 'proto'"]),
    (["--engine", "gevent"], {}, ["engine: 'gevent' is not one of"]),
    (["--config", "/nonexistent/sockserv.toml"], {}, ["cannot read /nonexistent/sockserv.toml"]),
    (["--no-such-flag"], {}, ["unrecognized arguments: --no-such-flag"]),
])
def test_bad_config_exits_2_with_one_line(args, env, fragments):
    assert_one_line_error(run_cli("echo", *args, env=env), 2, *fragments)


def test_bad_config_file_key_exits_2_before_binding(tmp_path):
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text(f"port = {port}\nmax_conections = 5\n")
    assert_one_line_error(run_cli("echo", "--config", str(path)), 2,
                          "unknown setting 'max_conections'", "did you mean 'max_connections'")
    with socket.socket() as probe:  # nothing was left bound
        probe.bind(("127.0.0.1", port))


def test_port_in_use_exits_1_with_one_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert_one_line_error(run_cli("echo", "--port", str(port)), 1,
                              f"cannot bind tcp 127.0.0.1:{port}", "in use")


def test_udp_port_in_use_exits_1():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        assert_one_line_error(run_cli("echo", "--proto", "udp", "--port", str(port)), 1,
                              "cannot bind udp")


def test_permission_denied_exits_1_with_one_line():
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to run the server as an unprivileged user")
    result = subprocess.run(
        ["python3", "-m", "sockserv", "echo", "--port", "1"], capture_output=True, text=True,
        timeout=20, user=65534, group=65534, env={"PYTHONPATH": str(_root()),
                                                  "PATH": os.environ["PATH"]},
        cwd="/")
    assert_one_line_error(result, 1, "cannot bind tcp 127.0.0.1:1", "ermission denied")


def _root():
    from .conftest import ROOT

    return ROOT


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_clients_connected_exits_0_and_closes_them(cli, engine, signum):
    server = cli("echo", "--engine", engine, "--port", "0")
    port = server.wait_serving()
    clients = [connect(port) for _ in range(5)]
    for sock in clients:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    server.signal(signum)
    assert server.wait() == 0
    for sock in clients:
        assert recv_until_eof(sock) == b""
        sock.close()
    server.wait_line("stopped")
    assert not any("Traceback" in line for line in server.seen)


def test_fork_engine_leaves_no_child_behind(cli):
    from .conftest import children_of

    server = cli("echo", "--engine", "fork", "--port", "0")
    port = server.wait_serving()
    clients = [connect(port) for _ in range(3)]
    for sock in clients:
        sock.sendall(b"x")
        recv_exactly(sock, 1)
    assert len(children_of(server.proc.pid)) == 3
    for sock in clients[:2]:
        sock.close()
    wait_for(lambda: len(children_of(server.proc.pid)) == 1, what="two children reaped")
    children = [pid for pid, _ in children_of(server.proc.pid)]
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    clients[2].close()
    import os

    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or "Z" not in open(f"/proc/{pid}/stat").read()


@pytest.mark.skipif(not shutil.which("nc"), reason="netcat-openbsd not installed")
def test_netcat_gets_its_lines_back(cli):
    server = cli("echo", "--port", "0")
    port = server.wait_serving()
    result = subprocess.run(["nc", "-N", "127.0.0.1", str(port)], input=b"one\ntwo\n",
                            capture_output=True, timeout=10)
    assert result.stdout == b"one\ntwo\n"


@pytest.mark.skipif(not shutil.which("socat"), reason="socat not installed")
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_socat_udp_datagram_comes_back(cli, engine):
    server = cli("echo", "--proto", "udp", "--engine", engine, "--port", "0")
    port = server.wait_serving()
    result = subprocess.run(["socat", "-T", "5", "-", f"UDP:127.0.0.1:{port}"],
                            input=b"datagram\n", capture_output=True, timeout=10)
    assert result.stdout == b"datagram\n"


def test_ipv6_host(cli):
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
    server = cli("echo", "--host", "::1", "--port", "0")
    line = server.wait_line(r"serving echo on tcp \[::1\]:\d+")
    port = int(line.rsplit(":", 1)[1].split()[0])
    assert many_tcp_clients(port, 3, 3, host="::1") == 9


def test_access_log_has_one_line_per_connection(cli):
    server = cli("echo", "--port", "0", "--access-log")
    port = server.wait_serving()
    with connect(port) as sock:
        sock.sendall(b"12345")
        recv_exactly(sock, 5)
    line = server.wait_line(r"in=5 out=5 duration=")
    assert "127.0.0.1:" in line


def test_serve_runs_a_users_handler_from_the_current_directory(cli, tmp_path):
    (tmp_path / "myapp.py").write_text(textwrap.dedent("""
        import sockserv

        class Upper(sockserv.LineHandler):
            def line_received(self, line):
                self.conn.write(line.upper() + b"\\n")
    """))
    server = cli("serve", "myapp:Upper", "--port", "0", cwd=str(tmp_path))
    port = server.wait_serving()
    with connect(port) as sock:
        sock.sendall(b"shout\n")
        assert recv_exactly(sock, 6) == b"SHOUT\n"
    udp = cli("serve", "myapp:Upper", "--port", "0", "--proto", "udp", cwd=str(tmp_path))
    port = udp.wait_serving()
    with udp_client() as sock:
        sock.sendto(b"a\nb", ("127.0.0.1", port))
        assert sock.recv(100) == b"A\n"
        assert sock.recv(100) == b"B\n"


@pytest.mark.parametrize("spec, fragment", [
    ("nosuchmodule_xyz:Thing", "cannot import 'nosuchmodule_xyz'"),
    ("json:NoSuchClass", "module 'json' has no 'NoSuchClass'"),
    ("json:dumps", "json:dumps is not a sockserv.Handler (or socketserver"),
    ("justaname", "is neither a built-in service (echo, push) nor MODULE:CLASS"),
    ("broken_mod:X", "importing 'broken_mod' failed: ZeroDivisionError"),
])
def test_bad_handler_spec_exits_2(tmp_path, spec, fragment):
    (tmp_path / "broken_mod.py").write_text("1 / 0\n")
    assert_one_line_error(run_cli("serve", spec, cwd=str(tmp_path)), 2, fragment)


def test_sighup_reloads_live_settings_and_names_the_others(cli, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("max_line = 100\n")
    server = cli("serve", "sockserv:LineHandler", "--config", str(path), "--port", "0")
    server.wait_serving()
    path.write_text('max_line = 5\nhost = "127.0.0.2"\nengine = "fork"\n')
    server.signal(signal.SIGHUP)
    server.wait_line("reload: engine, host need")
    # max_connections follows the running engine, not the one named in the file
    assert "(changed: max_line)" in server.wait_line("reloaded config")
    path.write_text("max_line = -1\n")
    server.signal(signal.SIGHUP)
    server.wait_line(r"reload failed, keeping the old config: max_line: -1 is out of range")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
