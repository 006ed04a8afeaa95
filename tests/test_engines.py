"""The conformance suite: the same behaviour on every engine, over TCP and UDP,
with real sockets. New engines join by being listed in ``sockserv.engines.ENGINES``."""

from __future__ import annotations

import logging
import os
import queue
import socket
import socketserver
import threading

import pytest

import sockserv
from sockserv import EchoHandler, Handler, LineHandler
from sockserv.background import SERVER_SIGNALS
from sockserv.engines.blocking import SMALL_RECV, Flusher

from .conftest import (
    ENGINE_NAMES,
    children_of,
    connect,
    hangup,
    many_tcp_clients,
    many_udp_clients,
    read_line,
    recv_exactly,
    recv_until_eof,
    udp_client,
    wait_for,
)

TCP_CLASSES = [sockserv.TCPServer, sockserv.ThreadingTCPServer, sockserv.ForkingTCPServer,
               sockserv.SelectorTCPServer]
UDP_CLASSES = [sockserv.UDPServer, sockserv.ThreadingUDPServer, sockserv.ForkingUDPServer,
               sockserv.SelectorUDPServer]


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- echo over every engine --------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tcp_round_trip(serve, engine):
    server = serve(engine, EchoHandler)
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"hello\n")
        assert recv_exactly(sock, 6) == b"hello\n"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_udp_round_trip_including_empty_datagram(serve, engine):
    server = serve(engine, EchoHandler, proto="udp")
    with udp_client() as sock:
        for payload in (b"one", b"", b"\x00" * 1400):
            sock.sendto(payload, server.server_address)
            assert sock.recv(65536) == payload


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_one_mebibyte_of_random_bytes_comes_back_identical(serve, engine):
    server = serve(engine, EchoHandler)
    data = os.urandom(1 << 20)
    with connect(server.server_address[1]) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        assert recv_exactly(sock, len(data)) == data
        sender.join(10)


class SubclassedEcho(EchoHandler):
    """Not exactly EchoHandler: takes the engines' general path, not their echo path."""


@pytest.mark.parametrize("handler", [EchoHandler, SubclassedEcho], ids=["echo", "general"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_messages_around_the_small_read_size_come_back_whole(serve, engine, handler):
    # Reads start at SMALL_RECV bytes and grow to 64 KiB when one fills up: sizes
    # under, at and over it, bulk, then small again, each echoed whole before the next.
    server = serve(engine, handler)
    with connect(server.server_address[1]) as sock:
        for size in (1, SMALL_RECV - 1, SMALL_RECV, SMALL_RECV + 1, 200_000, 64, SMALL_RECV, 3):
            data = os.urandom(size)
            sender = threading.Thread(target=sock.sendall, args=(data,))  # bulk: no deadlock
            sender.start()
            assert recv_exactly(sock, size) == data
            sender.join(10)


class ChunkSizes(Handler):
    """Answers each data_received call with the size of its data."""

    def data_received(self, data: bytes) -> None:
        self.conn.write(b"%d\n" % len(data))


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_message_just_over_the_small_read_size_is_handled_in_one_piece(serve, engine):
    # A small read that fills up is topped up at once: a 512-byte message sent in one
    # piece is not split into 479 + 33 (a split echo can stall on Nagle).
    server = serve(engine, ChunkSizes)
    with connect(server.server_address[1]) as sock:
        for size in (64, 512, 64, SMALL_RECV, 700):
            sock.sendall(b"x" * size)
            assert read_line(sock) == b"%d\n" % size


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_large_udp_datagram_comes_back_whole(serve, engine):
    server = serve(engine, EchoHandler, proto="udp")
    data = os.urandom(60000)
    with udp_client() as sock:
        sock.sendto(data, server.server_address)
        assert sock.recv(65536) == data


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_two_hundred_tcp_clients_times_one_hundred_messages(serve, engine):
    server = serve(engine, EchoHandler)
    assert many_tcp_clients(server.server_address[1], 200, 100) == 200 * 100


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_two_hundred_udp_clients_times_one_hundred_datagrams(serve, engine):
    server = serve(engine, EchoHandler, proto="udp")
    assert many_udp_clients(server.server_address[1], 200, 100) == 200 * 100


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_half_close_still_gets_every_byte_back_then_eof(serve, engine):
    server = serve(engine, EchoHandler)
    data = os.urandom(300_000)
    with connect(server.server_address[1]) as sock:
        def send_then_half_close():
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_then_half_close)
        sender.start()
        assert recv_until_eof(sock) == data
        sender.join(10)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_ipv6(serve, engine, proto):
    server = serve(engine, EchoHandler, proto=proto, host="::1")
    assert server.address_family == socket.AF_INET6
    port = server.server_address[1]
    if proto == "tcp":
        assert many_tcp_clients(port, 2, 3, host="::1") == 6
    else:
        assert many_udp_clients(port, 2, 3, host="::1") == 6


# -- drop-in: classic socketserver handlers, unchanged --------------------------------------


class ClassicUpper(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


class ClassicDatagramUpper(socketserver.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.read().upper())


class ClassicRaw(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(1024)
        self.request.sendall(b"raw:" + data)


@pytest.mark.parametrize("cls", TCP_CLASSES, ids=lambda c: c.__name__)
def test_classic_stream_request_handler_runs_unchanged(serve, cls):
    server = serve(cls, ClassicUpper)
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"abc\ndef\n")
        assert recv_exactly(sock, 8) == b"ABC\nDEF\n"
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""


@pytest.mark.parametrize("cls", TCP_CLASSES, ids=lambda c: c.__name__)
def test_classic_base_request_handler_runs_unchanged(serve, cls):
    server = serve(cls, ClassicRaw)
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"x")
        assert recv_until_eof(sock) == b"raw:x"


@pytest.mark.parametrize("cls", UDP_CLASSES, ids=lambda c: c.__name__)
def test_classic_datagram_request_handler_runs_unchanged(serve, cls):
    server = serve(cls, ClassicDatagramUpper, proto="udp")
    with udp_client() as sock:
        for word in (b"abc", b"xyz"):
            sock.sendto(word, server.server_address)
            assert sock.recv(100) == word.upper()


def test_constructor_is_the_stdlib_one_and_config_is_optional():
    server = sockserv.ThreadingTCPServer(("127.0.0.1", 0), ClassicUpper, False)
    try:
        assert server.config == sockserv.Config()
        assert isinstance(server, socketserver.TCPServer)
        server.server_bind()
        server.server_activate()
        assert server.server_address[1] != 0
    finally:
        server.server_close()


def test_classic_handler_exception_is_logged_and_server_keeps_serving(serve, caplog):
    class Fails(socketserver.BaseRequestHandler):
        def handle(self):
            if self.request.recv(10) == b"boom":
                raise RuntimeError("classic handler blew up")
            self.request.sendall(b"fine")

    server = serve("thread", Fails)
    port = server.server_address[1]
    with caplog.at_level(logging.ERROR, logger="sockserv"), connect(port) as sock:
        sock.sendall(b"boom")
        assert recv_until_eof(sock) == b""
    wait_for(lambda: "classic handler blew up" in caplog.text, what="the logged traceback")
    with connect(port) as sock:
        sock.sendall(b"ok")
        assert recv_until_eof(sock) == b"fine"


# -- sockserv handlers on every server class --------------------------------------------


class Upper(LineHandler):
    def line_received(self, line):
        self.conn.write(line.upper() + b"\n")


class Counter(Handler):
    """Per-peer state: answers how many datagrams this peer has sent."""

    lost = []

    def connection_made(self):
        self.count = 0

    def data_received(self, data):
        self.count += 1
        self.conn.write(b"%d" % self.count)

    def connection_lost(self, exc):
        Counter.lost.append(self.conn.peer)


@pytest.mark.parametrize("cls", TCP_CLASSES, ids=lambda c: c.__name__)
def test_sockserv_line_handler_on_every_tcp_class(serve, cls):
    server = serve(cls, Upper)
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"hello\r\nwor")
        assert recv_exactly(sock, 6) == b"HELLO\n"
        sock.sendall(b"ld\nlast")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"WORLD\nLAST\n"


@pytest.mark.parametrize("cls", UDP_CLASSES, ids=lambda c: c.__name__)
def test_sockserv_handler_keeps_one_instance_per_udp_peer(serve, cls):
    server = serve(cls, Counter, proto="udp")
    with udp_client() as a, udp_client() as b:
        for expected in (b"1", b"2", b"3"):
            a.sendto(b"x", server.server_address)
            assert a.recv(10) == expected
        b.sendto(b"x", server.server_address)
        assert b.recv(10) == b"1"


IN_PROCESS_UDP_PEERS = [c for c in UDP_CLASSES if c is not sockserv.ForkingUDPServer]


@pytest.mark.parametrize("cls", IN_PROCESS_UDP_PEERS, ids=lambda c: c.__name__)
def test_udp_peer_expires_after_udp_idle(serve, cls):
    Counter.lost.clear()
    server = serve(cls, Counter, proto="udp", udp_idle=0.2)
    with udp_client() as sock:
        sock.sendto(b"x", server.server_address)
        assert sock.recv(10) == b"1"
        me = sock.getsockname()[1]
        wait_for(lambda: me in [port for _, port in Counter.lost], what="the peer to expire")
        sock.sendto(b"x", server.server_address)
        assert sock.recv(10) == b"1"  # a new instance


def test_forked_udp_peer_expires_after_udp_idle(serve):
    server = serve("fork", Counter, proto="udp", udp_idle=0.2)
    with udp_client() as sock:
        sock.sendto(b"x", server.server_address)
        assert sock.recv(10) == b"1"
        wait_for(lambda: server.live_count() == 0, what="the peer's child to exit")
        sock.sendto(b"x", server.server_address)
        assert sock.recv(10) == b"1"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_handler_exception_closes_only_that_connection(serve, engine, caplog):
    class Picky(LineHandler):
        def line_received(self, line):
            if line == b"boom":
                raise ValueError("handler blew up")
            self.conn.write(line + b"\n")

    server = serve(engine, Picky)
    port = server.server_address[1]
    with connect(port) as good, connect(port) as bad:
        good.sendall(b"a\n")
        assert recv_exactly(good, 2) == b"a\n"
        bad.sendall(b"boom\n")
        assert recv_until_eof(bad) == b""
        good.sendall(b"b\n")
        assert recv_exactly(good, 2) == b"b\n"
    if engine == "thread":  # a forked child logs to its own stderr
        failures = [r for r in caplog.records if "Picky.data_received failed" in r.message]
        assert len(failures) == 1 and failures[0].exc_info


def test_write_from_another_thread_never_blocks_and_arrives(serve):
    """A slow reader: writes from a foreign thread return at once; data arrives later."""
    conns = []

    class Collect(Handler):
        def connection_made(self):
            conns.append(self.conn)

    server = serve("thread", Collect, max_buffer=1 << 30)
    with connect(server.server_address[1]) as sock:
        wait_for(lambda: conns, what="the connection")
        chunk = os.urandom(64 * 1024)
        for _ in range(100):  # 6.4 MB: far more than the socket buffers hold
            conns[0].write(chunk)
        assert conns[0].buffered > 0
        conns[0].close()
        assert recv_until_eof(sock) == chunk * 100


# -- limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_over_max_connections_new_clients_wait_in_the_backlog(serve, engine):
    server = serve(engine, EchoHandler, max_connections=2)
    port = server.server_address[1]
    first, second = connect(port), connect(port)
    for sock in (first, second):
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
    third = connect(port, timeout=0.5)  # accepted by the kernel, not by the server
    third.sendall(b"waiting")
    with pytest.raises(TimeoutError):
        third.recv(10)
    hangup(first)
    third.settimeout(10)
    assert recv_exactly(third, 7) == b"waiting"
    hangup(second)
    hangup(third)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_idle_timeout_closes_a_silent_connection(serve, engine):
    server = serve(engine, EchoHandler, idle_timeout=0.2)
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
        assert recv_until_eof(sock) == b""


def test_input_after_the_select_engine_closes_is_dropped_not_echoed(serve, monkeypatch):
    # After close, select half-closes and reads and drops input until the peer's FIN
    # (so the peer gets no reset); its echo path must not send that input back.
    lost = queue.Queue()
    monkeypatch.setattr(EchoHandler, "connection_lost", lambda self, exc: lost.put(exc))
    server = serve("select", EchoHandler, idle_timeout=0.2)
    with connect(server.server_address[1]) as sock:
        assert recv_until_eof(sock) == b""  # idle: the server closed its side
        sock.sendall(b"late input\n")
        sock.shutdown(socket.SHUT_WR)
        assert lost.get(timeout=10) is None


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_client_that_does_not_read_is_paused_then_gets_everything(serve, engine):
    server = serve(engine, EchoHandler, max_buffer=64 * 1024)
    with connect(server.server_address[1]) as sock:
        sock.setblocking(False)
        sent = bytearray()
        block = os.urandom(64 * 1024)
        while len(sent) < 64 << 20:  # stop when the server stops reading (all buffers full)
            try:
                n = sock.send(block)
            except BlockingIOError:
                import selectors

                with selectors.DefaultSelector() as sel:
                    sel.register(sock, selectors.EVENT_WRITE)
                    if not sel.select(1.0):
                        break
                continue
            sent += block[:n]
        assert len(sent) < 64 << 20, "the server kept reading from a client that never reads"
        sock.settimeout(10)
        assert recv_exactly(sock, len(sent)) == bytes(sent)


def echo_server_with_short_sends(serve, engine):
    """An echo server whose sends come up short, so its output queues: accepted sockets
    inherit the listener's 4 KiB send buffer."""
    server = serve(engine, EchoHandler, max_buffer=64 * 1024)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return server


def echo_through_small_buffers(server, payload):
    """Send ``payload`` and half-close from one thread while this one reads the echo to
    EOF through a 4 KiB receive buffer; returns what came back."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(server.server_address)
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_until_eof(sock)
        sender.join(10)
        assert not sender.is_alive()
    return echoed


@pytest.mark.parametrize("engine", ["select", "thread"])  # fork: each child counts its own
def test_traffic_counts_every_echoed_byte_also_when_output_backs_up(serve, engine):
    server = echo_server_with_short_sends(serve, engine)
    payload = os.urandom(4 << 20)
    assert echo_through_small_buffers(server, payload) == payload
    wait_for(lambda: server.stats.snapshot()["bytes_out"] == len(payload), what="the count")
    assert server.stats.snapshot()["bytes_in"] == len(payload)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_echoes_backing_up_on_several_connections_never_mix(serve, engine):
    server = echo_server_with_short_sends(serve, engine)
    payloads = [os.urandom(1 << 20) for _ in range(3)]
    echoed = [None] * len(payloads)

    def client(i):
        echoed[i] = echo_through_small_buffers(server, payloads[i])

    clients = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in clients:
        t.start()
    for t in clients:
        t.join(30)
    assert [e == p for e, p in zip(echoed, payloads, strict=True)] == [True] * len(payloads)


def test_threads_are_released_when_connections_finish(serve):
    server = serve("thread", EchoHandler)
    before = threading.active_count()
    socks = [connect(server.server_address[1]) for _ in range(20)]
    wait_for(lambda: server.live_count() == 20, what="20 live connections")
    for sock in socks:
        sock.close()
    wait_for(lambda: server.live_count() == 0, what="threads to finish")
    wait_for(lambda: threading.active_count() <= before + 1, what="threads to be gone")


class SchedulingPolicy(Handler):
    """Answers with the scheduling policy of the thread that serves the connection."""

    def connection_made(self):
        self.conn.write(b"%d\n" % os.sched_getscheduler(0))


linux_scheduling = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"),
                                      reason="Linux scheduling policies")


@linux_scheduling
def test_connection_threads_run_under_batch_scheduling(serve):
    server = serve("thread", SchedulingPolicy)
    with connect(server.server_address[1]) as sock:
        assert read_line(sock) == b"%d\n" % os.SCHED_BATCH


@linux_scheduling
def test_a_scheduling_policy_chosen_for_the_server_is_left_alone():
    # Threads inherit their creator's policy: the connection threads start as SCHED_IDLE.
    server = sockserv.ThreadingTCPServer(("127.0.0.1", 0), SchedulingPolicy,
                                         config=sockserv.Config(shutdown_timeout=3.0))

    def serve_idle():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        server.serve_forever()

    thread = threading.Thread(target=serve_idle, daemon=True)
    thread.start()
    try:
        assert server.wait_serving(5)
        with connect(server.server_address[1]) as sock:
            assert read_line(sock) == b"%d\n" % os.SCHED_IDLE
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_forked_children_are_reaped_promptly(serve):
    server = serve("fork", EchoHandler)
    for _ in range(10):
        sock = connect(server.server_address[1])
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        hangup(sock)
    wait_for(lambda: server.live_count() == 0, what="children reaped")
    assert [pid for pid, state in children_of(os.getpid()) if state == "Z"] == []
    assert server.stats.connections_total == 10


# -- shutdown ----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_server_close_ends_connections_gracefully(engine):
    config = sockserv.Config(engine=engine, port=0, shutdown_timeout=5)
    server = sockserv.make_server(config, EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.wait_serving(5)
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"pending")
        assert recv_exactly(sock, 7) == b"pending"
        server.shutdown()
        thread.join(5)
        assert not thread.is_alive()
        server.server_close()  # the client sees end of stream, not a reset
        assert recv_until_eof(sock) == b""
    assert server.live_count() == 0


def test_shutdown_timeout_aborts_connections_that_do_not_finish():
    class Stubborn(Handler):
        def eof_received(self):
            pass  # keeps the connection open after end of input

    config = sockserv.Config(port=0, shutdown_timeout=0.2)
    server = sockserv.ThreadingTCPServer(("127.0.0.1", 0), Stubborn, config=config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.wait_serving(5)
    with connect(server.server_address[1]) as sock:
        wait_for(lambda: server.live_count() == 1, what="the connection")
        server.shutdown()
        assert server.close_connections(0.2) == 1
        assert recv_until_eof(sock) == b""
    server.server_close()


def test_shutdown_from_the_serving_thread_does_not_deadlock(serve):
    class StopsServer(Handler):
        def data_received(self, data):
            self.conn.server.shutdown()
            self.conn.write(b"bye")
            self.conn.close()

    server = sockserv.TCPServer(("127.0.0.1", 0), StopsServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with connect(server.server_address[1]) as sock:
        sock.sendall(b"stop")
        assert recv_until_eof(sock) == b"bye"
    thread.join(5)
    assert not thread.is_alive()
    server.server_close()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_close_flushes_what_other_threads_wrote_before_it(serve, engine):
    class WritesFromAThreadThenCloses(LineHandler):
        def line_received(self, line):
            writer = threading.Thread(
                target=lambda: [self.conn.write(b"%d\n" % i) for i in range(30)])
            writer.start()
            writer.join()
            self.conn.close()

    server = serve(engine, WritesFromAThreadThenCloses)
    expected = b"".join(b"%d\n" % i for i in range(30))
    for _ in range(5):
        with connect(server.server_address[1]) as sock:
            sock.sendall(b"go\n")
            assert recv_until_eof(sock) == expected


def test_helper_threads_leave_the_server_signals_to_the_threads_that_act_on_them():
    """The kernel gives a process signal to any thread not blocking it: were it the
    flusher (or the relay's or the bus's thread), a fork child's reader, blocked in
    recv, would not see its SIGTERM."""
    def blocked(thread):
        with open(f"/proc/self/task/{thread.native_id}/status") as status:
            for line in status:
                if line.startswith("SigBlk:"):
                    mask = int(line.split()[1], 16)
                    return {signum for signum in SERVER_SIGNALS if mask >> (signum - 1) & 1}
        raise AssertionError("no SigBlk")

    Flusher.get()  # started on first use
    flusher = next(t for t in threading.enumerate() if t.name == "sockserv-flusher")
    assert blocked(flusher) == set(SERVER_SIGNALS)
    assert blocked(threading.current_thread()) == set()  # the starter's mask is back
