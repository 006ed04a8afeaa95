"""The PROXY protocol (v1 and v2): the pure parser (known headers, and properties
over any bytes), then every engine with real sockets (the header's client is
what handlers, access rules, per-IP limits and the access log see; untrusted,
malformed and missing headers are refused and counted; TLS after the header),
the settings, and sockserv behind a real HAProxy sending ``send-proxy-v2``.

Headers are built here by hand from the spec (``v1()``, ``v2()``), not by the code
under test. Clients bind to 127.0.0.x source addresses (all of 127/8 is loopback),
so an untrusted load balancer can be 127.0.0.2 while 127.0.0.1 is trusted."""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import struct
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sockserv
from sockserv import Config, Handler
from sockserv.connection import format_address
from sockserv.proxy import V2_SIGNATURE, HeaderReader, ProxyError, ProxyHeader, parse_header

from . import test_tls, test_unix
from .conftest import (
    ENGINE_NAMES,
    hangup,
    recv_exactly,
    recv_until_eof,
    run_cli,
    wait_for,
)
from .conftest import read_line as conftest_read_line
from .test_access import client_from, refused, refused_from

pki = test_tls.pki  # the throwaway certificates (a session fixture)
sockdir = test_unix.sockdir  # a short directory for socket files


# -- headers, built from the spec ------------------------------------------------------


def default_destination(source):
    return ("2001:db8::1", 80) if ":" in source[0] else ("192.0.2.1", 80)


def v1(source, destination=None):
    """A version 1 line for ``source`` and ``destination`` (host, port)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    destination = destination or default_destination(source)
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())


def v2(source=None, destination=None, command=1, tlvs=b"", family=None,
       protocol=1, block=None):
    """A version 2 header: PROXY (``command`` 1) for ``source``, or with ``source``
    None and ``family`` 0 the AF_UNSPEC/LOCAL form; ``tlvs`` appended after the
    addresses; ``block`` replaces the address block."""
    if block is None:
        if source is None:
            block = b""
        else:
            destination = destination or default_destination(source)
            src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
            block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    if family is None:
        family = 0 if source is None else (1 if ":" not in source[0] else 2)
    body = block + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | protocol]) + \
        struct.pack("!H", len(body)) + body


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


LOCAL = v2(command=0, protocol=0)
WORST_V1 = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"


# -- the parser: known headers -----------------------------------------------------------


GOOD = [
    (v1(("192.168.0.1", 56324), ("192.168.0.11", 443)), 1, "PROXY", ("192.168.0.1", 56324)),
    (v1(("255.255.255.255", 65535), ("0.0.0.0", 0)), 1, "PROXY", ("255.255.255.255", 65535)),
    (v1(("2001:db8::7", 1), ("::1", 2)), 1, "PROXY", ("2001:db8::7", 1)),
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 1 2\r\n", 1, "PROXY", ("2001:db8::7", 1)),
    (b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n", 1, "PROXY",  # inet_ntop's mapped form
     (str(ipaddress.ip_address("::ffff:10.0.0.1")), 1)),
    (b"PROXY UNKNOWN\r\n", 1, "PROXY", None),
    (WORST_V1, 1, "PROXY", None),
    (v2(("10.1.2.3", 4444)), 2, "PROXY", ("10.1.2.3", 4444)),
    (v2(("2001:db8::5", 9)), 2, "PROXY", ("2001:db8::5", 9)),
    (v2(("10.1.2.3", 4444), tlvs=tlv(1, b"h2") + tlv(4, b"\0" * 300)), 2, "PROXY",
     ("10.1.2.3", 4444)),
    (LOCAL, 2, "LOCAL", None),
    (v2(command=0, family=1, block=bytes(12)), 2, "LOCAL", None),  # LOCAL: addresses ignored
    (v2(command=0, family=7, protocol=9), 2, "LOCAL", None),  # ... and so is the family
    (v2(family=0, protocol=0), 2, "PROXY", None),  # AF_UNSPEC: the real peer
    (v2(family=3, block=b"/run/a".ljust(108, b"\0") * 2), 2, "PROXY", None),  # AF_UNIX
    (v2(family=1, protocol=2, block=bytes(12)), 2, "PROXY", None),  # UDP: fall back
]


@pytest.mark.parametrize("data, version, command, source", GOOD)
def test_known_good_headers(data, version, command, source):
    header = parse_header(data + b"\x16\x03\x01 and what follows")
    assert header == ProxyHeader(version, command, len(data), source, header.destination)
    if source is not None:
        assert header.destination is not None


def test_the_longest_version_1_line_is_107_bytes():
    assert len(WORST_V1) == 107 and parse_header(WORST_V1).length == 107
    with pytest.raises(ProxyError, match="without CRLF in its first 107 bytes"):
        parse_header(WORST_V1.replace(b"UNKNOWN ", b"UNKNOWN  "))
    with pytest.raises(ProxyError, match="without CRLF in its first 107 bytes"):
        parse_header(b"PROXY UNKNOWN " + b"x" * 200)


BAD = [
    (b"GET / HTTP/1.1\r\n", "no header"),
    (b"\x16\x03\x01\x02\x00", "no header"),  # a TLS ClientHello
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "no header"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "protocol 'TCP5'"),
    (b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "protocol"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX", "bare CR"),
    (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "exactly 5 fields"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "exactly 5 fields"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "exactly 5 fields"),
    (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "source address '01.2.3.4'"),
    (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", "source address"),
    (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "source address"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "source address '::1' is not a canonical IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "source address '1.2.3.4' is not a canonical IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "canonical IPv6"),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "canonical IPv6"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "source port '01'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "destination port '65536'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n"[:6] + b"\xff" * 20 + b"\r\n", "protocol"),
    (V2_SIGNATURE[:11] + b"X", "no header"),
    (V2_SIGNATURE + b"\x11", "version 1 (2 expected)"),
    (V2_SIGNATURE + b"\x22", "command 2"),
    (v2(family=4, block=bytes(12)), "address family 4"),
    (v2(family=1, protocol=3, block=bytes(12)), "transport protocol 3"),
    (v2(family=1, block=bytes(11)), "11 bytes is too short for its family (12 bytes)"),
    (v2(family=2, block=bytes(12)), "too short for its family (36 bytes)"),
    (v2(family=3, block=bytes(108)), "too short for its family (216 bytes)"),
]


@pytest.mark.parametrize("data, reason", BAD)
def test_known_bad_headers_raise_one_reason(data, reason):
    with pytest.raises(ProxyError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_header(data)
    assert issubclass(ProxyError, ValueError)


@pytest.mark.parametrize("start", [b"G", b"\x16", b"\x00", b"P\x00", b"PROXY\r", b"\r\n\r\n\x01",
                                   b"PROXY TCP", b"PROXY UNK"])
def test_the_first_bytes_tell_a_missing_header_or_wait(start):
    """Bytes that cannot begin a header are refused at once, without waiting for more."""
    if start in (b"PROXY TCP", b"PROXY UNK"):
        assert parse_header(start) is None
    else:
        with pytest.raises(ProxyError):
            parse_header(start)


# -- the parser: properties ---------------------------------------------------------------


ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@st.composite
def valid_headers(draw):
    """(header bytes, the source it names or None)."""
    kind = draw(st.sampled_from(["v1-tcp4", "v1-tcp6", "v1-unknown", "v2", "v2-local"]))
    if kind.startswith("v1-tcp"):
        hosts = v4 if kind == "v1-tcp4" else v6
        source = (draw(hosts), draw(ports))
        return v1(source, (draw(hosts), draw(ports))), source
    if kind == "v1-unknown":
        rest = draw(st.binary(max_size=92).filter(lambda b: b"\r" not in b and b"\n" not in b))
        return b"PROXY UNKNOWN" + (b" " + rest if rest else b"") + b"\r\n", None
    tlvs = draw(st.binary(max_size=600))
    if kind == "v2-local":
        return v2(command=0, protocol=0, tlvs=tlvs), None
    hosts = draw(st.sampled_from([v4, v6]))
    source = (draw(hosts), draw(ports))
    return v2(source, (draw(hosts), draw(ports)), tlvs=tlvs), source


def parse_or_error(data):
    try:
        return parse_header(data)
    except ProxyError as exc:
        assert str(exc) and "\n" not in str(exc)
        return exc


@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
                 st.binary(max_size=60).map(lambda b: V2_SIGNATURE + b"\x21" + b)))
def test_any_bytes_give_a_header_none_or_proxy_error(data):
    result = parse_or_error(data)
    assert result is None or isinstance(result, ProxyHeader | ProxyError)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
        assert parse_header(data[:result.length]) == result  # nothing after it counts


@given(valid_headers(), st.binary(max_size=200))
def test_any_prefix_of_a_valid_header_needs_more_and_trailing_data_is_never_consumed(
        header_source, trailing):
    data, source = header_source
    for end in range(len(data)):
        assert parse_header(data[:end]) is None, data[:end]
    header = parse_header(data + trailing)
    assert header.length == len(data) and header.source == (
        None if source is None else (str(ipaddress.ip_address(source[0])), source[1]))


@given(valid_headers(), st.binary(max_size=200), st.lists(st.integers(1, 64), max_size=30),
       st.integers(1, 200))
def test_the_reader_takes_exactly_the_header_off_a_stream_split_any_way(
        header_source, trailing, arrivals, peek_limit):
    """What a socket would do: bytes arrive in pieces, the reader peeks at what is
    there and consumes what it says; what stays is exactly what followed the header."""
    data, _ = header_source
    stream = data + trailing
    arrived, taken, reader = 0, 0, HeaderReader()
    pieces = iter(arrivals)
    header = None
    while header is None:
        arrived = min(len(stream), arrived + next(pieces, len(stream)))
        peeked = stream[taken:arrived][:min(reader.wanted, peek_limit)]
        if not peeked:
            continue
        consume, header = reader.peeked(peeked)
        assert 0 <= consume <= len(peeked)
        taken += consume
    assert taken == len(data) and stream[taken:] == trailing
    assert reader.received == data


# -- every engine, real sockets --------------------------------------------------------------


class Who(Handler):
    """Says whom it serves (``conn.peer``), then echoes."""

    def connection_made(self):
        self.conn.write(format_address(self.conn.peer).encode() + b"\n")

    def data_received(self, data):
        self.conn.write(data)


def proxy_serve(serve, engine, handler=Who, **settings):
    settings.setdefault("proxy_allow", "127.0.0.1/32")
    return serve(engine, handler, proxy_protocol=True, **settings)


def read_line(sock):
    """The next line, as text without its newline."""
    return conftest_read_line(sock).decode().rstrip("\n")


def through(port, header, source="127.0.0.1"):
    """A client from ``source`` that sent ``header`` and reads whom the server says."""
    sock = client_from(source, port)
    sock.sendall(header + b"ping")
    return sock, read_line(sock)


HEADERS = {
    "v1-tcp4": (v1(("10.1.2.3", 4444)), "10.1.2.3:4444"),
    "v1-tcp6": (v1(("2001:db8::7", 5555)), "[2001:db8::7]:5555"),
    "v2-inet": (v2(("10.1.2.3", 4444), tlvs=tlv(5, b"id-1")), "10.1.2.3:4444"),
    "v2-inet6": (v2(("2001:db8::7", 5555)), "[2001:db8::7]:5555"),
}


@pytest.mark.parametrize("kind", HEADERS)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_the_handler_sees_the_client_the_header_names(serve, engine, kind):
    server = proxy_serve(serve, engine)
    header, shown = HEADERS[kind]
    sock, who = through(server.server_address[1], header)
    with sock:
        assert who == shown
        assert recv_exactly(sock, 4) == b"ping"  # the data after the header, untouched
        sock.sendall(b"pong")
        assert recv_exactly(sock, 4) == b"pong"
    assert server.stats.proxy_refused == 0


@pytest.mark.parametrize("header", [LOCAL, b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_local_and_unknown_headers_keep_the_real_peer(serve, engine, header):
    server = proxy_serve(serve, engine)
    sock, who = through(server.server_address[1], header)
    with sock:
        assert who == format_address(sock.getsockname())
        assert recv_exactly(sock, 4) == b"ping"


class ClassicWho(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(format_address(self.client_address).encode() + b"\n")
        self.wfile.write(self.rfile.readline())


@pytest.mark.parametrize("cls", [sockserv.TCPServer, sockserv.ThreadingTCPServer,
                                 sockserv.ForkingTCPServer, sockserv.SelectorTCPServer],
                         ids=lambda c: c.__name__)
def test_a_classic_handler_gets_the_header_address_as_client_address(serve, cls):
    server = proxy_serve(serve, cls, ClassicWho)
    with client_from("127.0.0.1", server.server_address[1]) as sock:
        sock.sendall(v2(("10.9.8.7", 1234)) + b"line\n")
        assert read_line(sock) == "10.9.8.7:1234"
        assert read_line(sock) == "line"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_an_untrusted_source_is_reset_and_counted_and_others_still_served(serve, engine, caplog):
    server = proxy_serve(serve, engine)
    port = server.server_address[1]
    with caplog.at_level(logging.INFO, logger="sockserv"):
        assert refused_from("127.0.0.2", port)
        wait_for(lambda: server.stats.proxy_refused == 1, what="the refusal to be counted")
    assert any(r.getMessage().startswith("refused connection from 127.0.0.2:")
               and r.getMessage().endswith(": not in proxy_allow") for r in caplog.records)
    sock, who = through(port, v2(("10.1.2.3", 4444)))
    with sock:
        assert who == "10.1.2.3:4444"
    assert server.stats.connections_total == 1


MALFORMED = {
    "plain data": b"hello\n",
    "tls client hello": test_tls.client_hello(),
    "v1 bad address": b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n",
    "v1 bare lf": b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
    "v2 bad version": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "v2 short block": v2(family=1, block=bytes(4)),
}


@pytest.mark.parametrize("kind", MALFORMED)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_malformed_or_missing_header_is_refused_at_once_and_counted(serve, engine, kind):
    server = proxy_serve(serve, engine)
    server.proxy_header_timeout = 60.0  # a refusal within the client's 10 s is no timeout
    port = server.server_address[1]
    with client_from("127.0.0.1", port) as sock:
        sock.sendall(MALFORMED[kind])
        assert refused(sock)
    wait_for(lambda: server.stats.proxy_refused == 1, what="the refusal to be counted")
    assert server.proxy_pending == 0
    sock, who = through(port, v1(("10.1.2.3", 4444)))
    with sock:
        assert who == "10.1.2.3:4444"


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 10.1", V2_SIGNATURE + b"\x21\x11\x00"],
                         ids=["nothing", "v1-part", "v2-part"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_header_not_complete_in_time_is_refused_and_counted(serve, engine, sent, caplog):
    server = proxy_serve(serve, engine)
    server.proxy_header_timeout = 0.2
    with caplog.at_level(logging.WARNING, logger="sockserv"), \
            client_from("127.0.0.1", server.server_address[1]) as sock:
        sock.sendall(sent)
        assert refused(sock)
        wait_for(lambda: server.stats.proxy_refused == 1, what="the refusal to be counted")
    assert any("no PROXY header within 0.2s" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_peer_that_closes_before_sending_anything_is_not_counted(serve, engine):
    """A plain TCP health check connects and leaves: nothing to refuse."""
    server = proxy_serve(serve, engine)
    sock = client_from("127.0.0.1", server.server_address[1])
    wait_for(lambda: server.proxy_pending == 1, what="the connection to wait for its header")
    hangup(sock)
    wait_for(lambda: server.proxy_pending == 0, what="the wait to end")
    assert server.stats.proxy_refused == 0 and server.stats.connections_total == 0


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_connection_waiting_for_its_header_holds_a_slot(serve, engine):
    server = proxy_serve(serve, engine, max_connections=1)
    port = server.server_address[1]
    first = client_from("127.0.0.1", port)
    wait_for(lambda: server.proxy_pending == 1, what="the first to wait for its header")
    second = client_from("127.0.0.1", port)  # in the kernel's backlog, not accepted
    second.settimeout(0.5)
    second.sendall(v2(("10.2.2.2", 2)) + b"ping")
    with pytest.raises(TimeoutError):
        second.recv(100)
    assert server.proxy_pending == 1 and server.stats.connections_total == 0
    hangup(first)  # leaves before its header: its slot frees, the second is served
    second.settimeout(10)
    with second:
        assert read_line(second) == "10.2.2.2:2"


@pytest.mark.parametrize("header", [v1(("2001:db8::7", 5555)),
                                    v2(("10.1.2.3", 4444), tlvs=tlv(4, bytes(200)))],
                         ids=["v1", "v2"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_header_split_over_several_sends(serve, engine, header):
    server = proxy_serve(serve, engine)

    def consumed():
        waits = list(server._header_waits.values())
        return len(waits[0].reader.received) if waits else None

    with client_from("127.0.0.1", server.server_address[1]) as sock:
        for start, end in [(0, 1), (1, 7), (7, 13), (13, 15), (15, 20), (20, len(header) - 1)]:
            sock.sendall(header[start:end])
            wait_for(lambda end=end: consumed() == end, what=f"{end} header bytes taken")
        sock.sendall(header[-1:] + b"ping")
        assert read_line(sock) == format_address(parse_header(header).source)
        assert recv_exactly(sock, 4) == b"ping"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_allow_and_deny_apply_to_the_header_address(serve, engine):
    server = proxy_serve(serve, engine, allow="10.0.0.0/8", deny="10.9.9.9")
    port = server.server_address[1]
    for client in [("10.9.9.9", 1), ("11.0.0.1", 2)]:
        with client_from("127.0.0.1", port) as sock:
            sock.sendall(v2(client))
            assert refused(sock)
    wait_for(lambda: server.stats.denied == 2, what="two denials")
    sock, who = through(port, v1(("10.1.1.1", 3)))
    with sock:
        assert who == "10.1.1.1:3"
    # A health check (LOCAL) is the load balancer's own: served though not in allow.
    sock, who = through(port, LOCAL)
    with sock:
        assert who.startswith("127.0.0.1:")
    assert server.stats.proxy_refused == 0


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_max_connections_per_ip_counts_the_header_address(serve, engine):
    server = proxy_serve(serve, engine, max_connections_per_ip=1)
    port = server.server_address[1]
    first, who = through(port, v2(("10.1.1.1", 1)))
    assert who == "10.1.1.1:1"
    with client_from("127.0.0.1", port) as sock:
        sock.sendall(v2(("10.1.1.1", 2)))
        assert refused(sock)
    other, who = through(port, v2(("10.1.1.2", 3)))  # the load balancer's address is shared
    assert who == "10.1.1.2:3"
    assert server.connections_per_ip() == {"10.1.1.1": 1, "10.1.1.2": 1}
    assert server.stats.refused_per_ip == 1
    hangup(first)
    wait_for(lambda: "10.1.1.1" not in server.connections_per_ip(), what="the first uncounted")
    again, who = through(port, v2(("10.1.1.1", 4)))
    assert who == "10.1.1.1:4"
    for sock in (other, again):
        hangup(sock)
    wait_for(lambda: server.connections_per_ip() == {}, what="every connection uncounted")


@pytest.mark.parametrize("header", [v1(("10.1.2.3", 4444)), v2(("10.1.2.3", 4444))],
                         ids=["v1", "v2"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tls_after_the_header(serve, pki, engine, header):
    """HAProxy sends the header in clear, then the client's TLS handshake follows."""
    server = proxy_serve(serve, engine, **pki.settings())
    context = ssl.create_default_context(cafile=pki.ca)
    raw = client_from("127.0.0.1", server.server_address[1])
    raw.sendall(header)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert read_line(sock) == "10.1.2.3:4444"
        sock.sendall(b"secret")
        assert recv_exactly(sock, 6) == b"secret"
    assert server.stats.proxy_refused == 0


def test_a_connection_passed_by_systemd_reads_its_header_too():
    config = Config(port=0, proxy_protocol=True, proxy_allow=("127.0.0.1",))
    server = sockserv.ThreadingTCPServer(("127.0.0.1", 0), Who, False, config=config)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with client_from("127.0.0.1", port) as client:
            request, address = listener.accept()
            client.sendall(v2(("10.1.2.3", 4444)) + b"ping")
            client.shutdown(socket.SHUT_WR)
            serve = threading.Thread(target=server.serve_connection, args=(request, address))
            serve.start()
            assert recv_until_eof(client) == b"10.1.2.3:4444\nping"
            serve.join(10)
        with client_from("127.0.0.1", port) as client:
            request, address = listener.accept()
            client.sendall(b"no header\n")
            server.serve_connection(request, address)  # returns at once: refused
            assert refused(client)
    assert server.stats.proxy_refused == 1 and server.stats.connections_total == 1
    server.server_close()


def test_workers_and_the_access_log_see_the_header_address(cli):
    server = cli("echo", "--port", "0", "--workers", "2", "--proxy-protocol",
                 "--proxy-allow", "127.0.0.1/32", "--access-log")
    line = server.wait_line(r"supervisor \d+: \d+ \w+ worker\(s\) on ")
    port = int(line.rsplit(":", 1)[1])
    server.wait_line(r"supervisor \d+: \d+ worker\(s\) serving")
    for n in range(4):  # round the workers
        with client_from("127.0.0.1", port) as sock:
            sock.sendall(v2(("10.7.7.7", 1000 + n)) + b"hi")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"hi"
        server.wait_line(rf"10\.7\.7\.7:{1000 + n} in=2 out=2 ")
    assert refused_from("127.0.0.2", port)


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--proxy-protocol"], "proxy_allow: name your load balancers (CIDR networks, e.g. "
                           "10.0.0.5/32): with proxy_protocol on (from --proxy-protocol), "
                           "only they may connect"),
    (["--proxy-protocol", "--proxy-allow", "127.0.0.1", "--proto", "udp"],
     "proxy_protocol: needs proto tcp, not udp (the PROXY protocol over UDP is not "
     "supported) (from --proxy-protocol)"),
    (["--proxy-allow", "10.0.0.0/8"], "proxy_allow: needs proxy_protocol = true "
                                      "(from --proxy-allow)"),
    (["--proxy-protocol", "--proxy-allow", "10.0.0.300"], "proxy_allow: '10.0.0.300' is not a "
                                                          "CIDR network"),
    (["--proxy-protocol", "--proxy-allow", "10.0.0.1", "--unix", "/tmp/x.sock"],
     "proxy_allow: does not apply to unix"),
])
def test_bad_combinations_exit_2_with_one_line(args, message):
    result = run_cli("echo", "--port", "0", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"sockserv: error: {message}")
    assert result.stderr.count("\n") == 1


def test_settings_from_env_and_print_config(tmp_path):
    result = run_cli("echo", "--print-config", env={"SOCKSERV_PROXY_PROTOCOL": "true",
                                                    "SOCKSERV_PROXY_ALLOW": "10.0.0.5, ::1"})
    assert result.returncode == 0, result.stderr
    assert "proxy_protocol = true  # SOCKSERV_PROXY_PROTOCOL" in result.stdout
    assert 'proxy_allow = ["10.0.0.5/32", "::1/128"]  # SOCKSERV_PROXY_ALLOW' in result.stdout
    unix = run_cli("echo", "--print-config", "--proxy-protocol", "--unix",
                   str(tmp_path / "s.sock"))
    assert unix.returncode == 0, unix.stderr  # a Unix socket's peers need no proxy_allow


def test_over_a_unix_socket_every_peer_may_send_the_header(serve, sockdir):
    path = f"{sockdir}/proxied.sock"
    server = serve("select", Who, unix=path, proxy_protocol=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(v2(("10.1.2.3", 4444)) + b"ping")
        assert read_line(sock) == "10.1.2.3:4444"
        assert recv_exactly(sock, 4) == b"ping"
    with socket.socket(socket.AF_UNIX) as sock:  # a health check: the (nameless) real peer
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(LOCAL)
        assert read_line(sock) == "-"
    assert server.stats.proxy_refused == 0


# -- behind a real HAProxy ------------------------------------------------------------------


class Recorder(Who):
    """Who, remembering every peer it served."""

    peers: list = []

    def connection_made(self):
        Recorder.peers.append(self.conn.peer)
        super().connection_made()


def test_behind_haproxy_the_handler_sees_the_client_and_health_checks_pass(serve, haproxy,
                                                                            caplog):
    Recorder.peers = []
    server = proxy_serve(serve, "select", Recorder)
    with caplog.at_level(logging.DEBUG, logger="sockserv"):
        proxy = haproxy([server.server_address[1]])
        # HAProxy's checks (every 100 ms) send a v2 LOCAL header: served as the balancer.
        wait_for(lambda: sum(peer[0] == "127.0.0.1" for peer in Recorder.peers) >= 3,
                 what="three health checks")
        wait_for(lambda: proxy.server_status() == {"s0": "UP"}, what="the backend to be UP")
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    with client_from("127.0.0.5", proxy.port) as sock:
        assert read_line(sock) == format_address(sock.getsockname())  # 127.0.0.5:<port>
        sock.sendall(b"through haproxy")
        assert recv_exactly(sock, 15) == b"through haproxy"
    assert server.stats.proxy_refused == 0 and server.stats.denied == 0


def test_haproxy_to_a_tls_node(serve, pki, haproxy):
    server = proxy_serve(serve, "thread", **pki.settings())
    proxy = haproxy([server.server_address[1]])
    context = ssl.create_default_context(cafile=pki.ca)
    raw = client_from("127.0.0.5", proxy.port)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert read_line(sock) == format_address(sock.getsockname())
    assert server.stats.proxy_refused == 0

