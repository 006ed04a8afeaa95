"""Pre-forked workers under one supervisor: serving, restarts, signals, reuse_port."""

from __future__ import annotations

import os
import signal

import pytest

from .conftest import (
    children_of,
    connect,
    many_tcp_clients,
    many_udp_clients,
    read_line,
    recv_exactly,
    recv_until_eof,
    run_cli,
    wait_for,
)


def start_workers(cli, *args, service=("echo",)):
    server = cli(*service, "--port", "0", *args)
    line = server.wait_line(r"supervisor \d+: \d+ \w+ worker\(s\) on ")
    port = int(line.rsplit(":", 1)[1])
    server.wait_line(r"supervisor \d+: \d+ worker\(s\) serving")
    return server, port


def live_workers(server):
    return sorted(pid for pid, state in children_of(server.proc.pid) if state != "Z")


@pytest.mark.parametrize("engine", ["select", "thread"])
def test_workers_share_the_load_and_stop_cleanly(cli, engine):
    server, port = start_workers(cli, "--workers", "3", "--engine", engine)
    wait_for(lambda: len(live_workers(server)) == 3, what="3 workers")
    workers = live_workers(server)
    assert many_tcp_clients(port, 30, 20) == 600
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not any(os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read()
                   for pid in workers)


def test_a_killed_worker_is_replaced_and_service_goes_on(cli):
    server, port = start_workers(cli, "--workers", "2")
    wait_for(lambda: len(live_workers(server)) == 2, what="2 workers")
    victim = live_workers(server)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_line(rf"worker {victim} was killed by signal 9; starting another")
    wait_for(lambda: len(live_workers(server)) == 2 and victim not in live_workers(server),
             what="a replacement worker")
    assert many_tcp_clients(port, 10, 10) == 100


def test_ttin_and_ttou_add_and_remove_workers(cli):
    server, _ = start_workers(cli, "--workers", "2")
    wait_for(lambda: len(live_workers(server)) == 2, what="2 workers")
    server.signal(signal.SIGTTIN)
    server.wait_line(r"SIGTTIN: 3 worker\(s\)")
    wait_for(lambda: len(live_workers(server)) == 3, what="3 workers")
    server.signal(signal.SIGTTOU)
    server.wait_line(r"SIGTTOU: 2 worker\(s\)")
    wait_for(lambda: len(live_workers(server)) == 2, what="2 workers again")


def test_sighup_replaces_every_worker_without_refusing_anyone(cli):
    server, port = start_workers(cli, "--workers", "2")
    wait_for(lambda: len(live_workers(server)) == 2, what="2 workers")
    before = set(live_workers(server))
    with connect(port) as held:
        held.sendall(b"before")
        assert recv_exactly(held, 6) == b"before"
        server.signal(signal.SIGHUP)
        wait_for(lambda: before.isdisjoint(live_workers(server))
                 and len(live_workers(server)) == 2, what="new workers")
        assert recv_until_eof(held) == b""  # the old worker drained it gracefully
    assert many_tcp_clients(port, 5, 5) == 25


def test_crash_loop_is_slowed_down(cli, tmp_path):
    (tmp_path / "crashy.py").write_text(
        "import os, sockserv\n"
        "class Crash(sockserv.Handler):\n"
        "    def connection_made(self):\n"
        "        os._exit(3)\n")
    server = cli("serve", "crashy:Crash", "--port", "0", "--workers", "2", cwd=str(tmp_path))
    line = server.wait_line(r"supervisor \d+: 2 ")
    port = int(line.rsplit(":", 1)[1])
    for _ in range(4):
        try:
            with connect(port, timeout=2) as sock:
                recv_until_eof(sock)
        except OSError:
            pass
    line = server.wait_line(r"exited with status 3; starting another in \d")
    assert "in 0.0s" not in line


def test_reuse_port_workers_each_bind_and_a_full_one_strands_nobody(cli):
    server, port = start_workers(cli, "--workers", "2", "--reuse-port", "--max-connections", "3")
    wait_for(lambda: len(live_workers(server)) == 2, what="2 workers")
    held = [connect(port) for _ in range(4)]  # at least one worker is near its limit
    for sock in held:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    # Whichever worker the kernel picks, new clients are served while slots remain.
    late = [connect(port) for _ in range(2)]
    for sock in late:
        sock.sendall(b"y")
        assert recv_exactly(sock, 1) == b"y"
    for sock in held + late:
        sock.close()
    # A full worker left the group; with every worker full the port refused. Once the
    # connections are gone the workers listen again.
    wait_for(lambda: accepts(port), what="the workers to listen again")
    assert many_tcp_clients(port, 4, 5) == 20


def accepts(port):
    try:
        with connect(port, timeout=1) as sock:
            sock.sendall(b"?")
            return recv_exactly(sock, 1) == b"?"
    except OSError:
        return False


def test_udp_workers(cli):
    server, port = start_workers(cli, "--workers", "2", "--proto", "udp")
    assert many_udp_clients(port, 10, 10) == 100


def test_fork_with_workers_is_a_config_error():
    result = run_cli("echo", "--engine", "fork", "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.strip() == ("sockserv: error: workers: 2 workers do not go with "
                                     "engine fork, which forks per connection (from --workers)")


def test_port_in_use_with_workers_exits_1():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("echo", "--workers", "2", "--port", str(port))
    assert result.returncode == 1
    assert "cannot bind tcp 127.0.0.1" in result.stderr


def test_a_stop_signal_taken_by_a_connection_thread_still_stops_the_worker(cli):
    server, port = start_workers(cli, "--engine", "thread", "--workers", "2",
                                 service=("serve", "tests.fault_handlers:StopsFromItsThread"))
    with connect(port) as sock:
        sock.sendall(b"stop\n")
        pid = int(read_line(sock))
        # the worker stops as asked (its serve loop woke up): end of input, then exit 0
        assert recv_until_eof(sock) == b""
    server.wait_line(rf"worker {pid} exited with status 0; starting another")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
