"""What the select engine promises beyond the conformance suite: bounded memory for a
client that never reads, no spinning when descriptors run out, graceful stops under load."""

from __future__ import annotations

import os
import selectors
import signal
import socket

from .conftest import connect, recv_exactly, recv_until_eof


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_that_never_reads_cannot_grow_server_memory(cli):
    server = cli("echo", "--port", "0", "--max-buffer", "65536")
    port = server.wait_serving()
    before = rss_kib(server.proc.pid)
    with connect(port) as sock:
        sock.setblocking(False)
        block = os.urandom(1 << 16)
        sent = 0
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_WRITE)
            while sent < 256 << 20 and sel.select(1.0):  # until the server stops reading
                try:
                    sent += sock.send(block)
                except BlockingIOError:
                    pass
        assert sent < 256 << 20
        grown = rss_kib(server.proc.pid) - before
        assert grown < 8 * 1024, f"server RSS grew {grown} KiB for one stalled client"
        sock.setblocking(True)
        sock.settimeout(10)
        received = 0
        while received < sent:  # and everything flows once the client reads
            chunk = sock.recv(1 << 20)
            assert chunk
            received += len(chunk)
        assert received == sent


def test_out_of_descriptors_the_server_backs_off_and_recovers(cli):
    """Under RLIMIT_NOFILE 64 with max_connections far above it, accept fails with
    EMFILE: the server must pause accepting (not spin), then serve once fds free up."""
    server = cli("echo", "--port", "0", "--max-connections", "5000",
                 prefix=("prlimit", "--nofile=64:64", "--"))
    port = server.wait_serving()
    clients = [connect(port) for _ in range(120)]  # more than 64 descriptors allow
    server.wait_line(r"accept failed \(Too many open files\): pausing accepting")
    start = cpu_seconds(server.proc.pid)
    with socket.socket() as waiter:
        waiter.settimeout(1.0)
        try:  # a bounded wait for an answer that cannot come while saturated
            waiter.connect(("127.0.0.1", port))
            waiter.sendall(b"?")
            waiter.recv(1)
        except OSError:
            pass
    spent = cpu_seconds(server.proc.pid) - start
    assert spent < 0.5, f"the saturated server burned {spent:.2f}s of CPU in about 1s"
    for sock in clients:
        sock.close()
    with connect(port) as sock:
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"


def test_graceful_stop_with_a_thousand_connections_echoes_every_accepted_byte(cli):
    server = cli("echo", "--port", "0")
    port = server.wait_serving()
    clients = [connect(port) for _ in range(1000)]
    for i, sock in enumerate(clients):  # every connection accepted and answering
        sock.sendall(b"%06d" % i)
    for i, sock in enumerate(clients):
        assert recv_exactly(sock, 6) == b"%06d" % i
    for i, sock in enumerate(clients):  # then bytes in flight when the stop comes
        sock.sendall(b"+%06d" % i)
    server.signal(signal.SIGTERM)
    for i, sock in enumerate(clients):
        assert recv_until_eof(sock) == b"+%06d" % i
        sock.close()
    assert server.wait() == 0
    server.wait_line("stopped")


def test_max_connections_keeps_the_rest_in_the_backlog(cli):
    server = cli("echo", "--port", "0", "--max-connections", "3")
    port = server.wait_serving()
    served = [connect(port) for _ in range(3)]
    for sock in served:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
    waiting = connect(port, timeout=0.5)
    waiting.sendall(b"b")
    try:
        waiting.recv(1)
        raise AssertionError("served over max_connections")
    except TimeoutError:
        pass
    served[0].close()
    waiting.settimeout(10)
    assert recv_exactly(waiting, 1) == b"b"
