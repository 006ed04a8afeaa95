"""What the select engine promises beyond the conformance suite: bounded memory for a
client that never reads, no spinning when descriptors run out, graceful stops under load."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import threading

import pytest

from sockserv import Handler

from .conftest import connect, read_line, recv_exactly, recv_until_eof, wait_for


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


def test_a_connection_kept_open_after_end_of_input_is_no_longer_polled(serve):
    class RepliesLater(Handler):
        turn_at_eof = None

        def eof_received(self):  # keep the connection: answer 0.2 s later, then close
            server = self.conn.server
            if self.turn_at_eof is None:
                self.turn_at_eof = server.turn
                server.timers.call_at(server.now + 0.2, self.reply)

        def reply(self):
            self.conn.write(b"turns %d\n" % (self.conn.server.turn - self.turn_at_eof))
            self.conn.close()

    server = serve("select", RepliesLater)
    with connect(server.server_address[1]) as sock:
        sock.shutdown(socket.SHUT_WR)
        reply = recv_until_eof(sock)
    # An end of input still polled for reading would wake the loop on every turn.
    assert reply.startswith(b"turns ")
    assert int(reply.split()[1]) < 20, reply


def test_a_connection_closed_while_a_forked_process_holds_it_does_not_wake_the_loop(serve):
    class AbortsOnInput(Handler):
        def data_received(self, data):
            self.conn.abort()

    counted = threading.Event()
    turns = []

    def count(start):
        turns.append(server.turn - start)
        counted.set()

    server = serve("select", AbortsOnInput)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    with connect(server.server_address[1]) as sock:
        wait_for(lambda: server.live_count() == 1, what="the connection")
        child = os.fork()  # holds a copy of every descriptor, the connection's too
        if child == 0:
            try:
                os.write(ready_w, b"x")
                os.read(release_r, 1)
            finally:
                os._exit(0)
        try:
            assert os.read(ready_r, 1) == b"x"
            sock.sendall(b"close")
            wait_for(lambda: server.live_count() == 0, what="the server to close it")
            sock.sendall(b"more")  # the file, still open in the child, is now readable
            server.call_soon_threadsafe(lambda: server.timers.call_at(
                server.now + 0.2, lambda start=server.turn: count(start)))
            assert counted.wait(10)
        finally:
            os.write(release_w, b"x")
            os.waitpid(child, 0)
            for fd in (ready_r, ready_w, release_r, release_w):
                os.close(fd)
    assert turns[0] < 20, f"the loop turned {turns[0]} times in 0.2 s"


class KeepsTheFirst(Handler):
    """(served by the next test) "bye" closes this connection; "write" and "gather"
    send to the first connection the server made that way, then answer with both
    connections' descriptor numbers."""

    made: list = []

    def connection_made(self):
        self.fd = self.conn.fd
        self.made.append(self)

    def data_received(self, data):
        if data == b"bye":
            self.conn.abort()
        elif data in (b"write", b"gather"):
            first = self.made[0]
            getattr(first.conn, data.decode())(b"LEAK")
            self.conn.write(b"%d %d\n" % (first.fd, self.fd))


@pytest.mark.parametrize("how", ["write", "gather"])
def test_a_write_to_a_closed_connection_never_reaches_the_next_owner_of_its_descriptor(cli, how):
    # The engine writes with os.write on the descriptor number: once a connection's
    # socket is closed, that number is free for the next connection accepted.
    server = cli("serve", "tests.test_select:KeepsTheFirst", "--port", "0")
    port = server.wait_serving()
    with connect(port) as first:
        first.sendall(b"bye")
        recv_until_eof(first)
    with connect(port) as second:
        second.sendall(how.encode())
        line = read_line(second)
    assert re.fullmatch(rb"\d+ \d+\n", line), line  # nothing but its own answer
    old, new = line.split()
    if old != new:
        pytest.skip(f"the descriptor number was not handed on ({old} then {new})")
