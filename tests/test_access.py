"""Access rules (allow, deny) and max_connections_per_ip: the pure rules, the settings,
and every engine refusing peers before a handler runs.

Loopback only: a client picks its source address in 127.0.0.0/8 (bind before
connect), so 127.0.0.2 can be denied while 127.0.0.1 is served; a server bound to
``::ffff:127.0.0.1`` sees its IPv4 clients as IPv4-mapped IPv6 addresses."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import socketserver
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockserv import Config, ConfigError, EchoHandler, ThreadingTCPServer
from sockserv.access import AccessRules, normalise_address, parse_networks, peer_key
from sockserv.config import load_config, to_toml
from sockserv.log import RateLimitedLog

from .conftest import (
    ENGINE_NAMES,
    PROTOS,
    hangup,
    recv_exactly,
    recv_until_eof,
    run_cli,
    udp_client,
    wait_for,
)

# -- the pure rules ---------------------------------------------------------------------------


def test_parse_networks_takes_lists_and_comma_separated_text():
    assert parse_networks(["10.0.0.0/8", "2001:db8::/32"]) == ("10.0.0.0/8", "2001:db8::/32")
    assert parse_networks(" 10.0.0.0/8 ,192.0.2.7, ::1 ") == ("10.0.0.0/8", "192.0.2.7/32",
                                                              "::1/128")
    assert parse_networks("") == parse_networks("  ") == parse_networks([]) == ()
    assert parse_networks("10.1.2.3/8") == ("10.0.0.0/8",)  # host bits are ignored
    assert parse_networks("10.0.0.0/8,10.0.0.0/8") == ("10.0.0.0/8",)


def test_parse_networks_turns_ipv4_mapped_networks_into_ipv4():
    assert parse_networks("::ffff:10.0.0.0/104") == ("10.0.0.0/8",)
    assert parse_networks(["::ffff:192.0.2.7"]) == ("192.0.2.7/32",)
    assert parse_networks("::ffff:0:0/95") == ("::fffe:0:0/95",)  # wider: not only mapped


@pytest.mark.parametrize("value, message", [
    ("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR network"),
    ("10.0.0.0/8,banana", "'banana' is not a CIDR network"),
    ("10.0.0.0/8,,", "'' is not a CIDR network"),
    (["10.0.0.0/8", 7], "7 is not a CIDR network"),
    (12, "12 is not a list of CIDR networks"),
])
def test_parse_networks_names_the_bad_entry(value, message):
    with pytest.raises(ValueError) as info:
        parse_networks(value)
    assert str(info.value).startswith(message)


def test_deny_wins_over_allow_and_an_empty_allow_allows_all():
    rules = AccessRules(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    assert rules.check("10.1.2.3") is None
    assert rules.check("10.9.1.1") == "denied by 10.9.0.0/16"
    assert rules.check("192.0.2.1") == "not in allow"
    open_rules = AccessRules(deny=["192.0.2.0/24"])
    assert open_rules.permits("198.51.100.1") and open_rules.permits("2001:db8::1")
    assert not open_rules.permits("192.0.2.200")
    assert not AccessRules() and AccessRules(deny=["::1"])


def test_ipv4_mapped_peers_and_zones_are_normalised():
    rules = AccessRules(deny=["127.0.0.2"])
    assert not rules.permits("::ffff:127.0.0.2")
    assert not rules.permits("::FFFF:127.0.0.2")
    assert rules.permits("::ffff:127.0.0.1")
    assert normalise_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert AccessRules(allow=["fe80::/10"]).permits("fe80::1%lo")
    assert peer_key("::ffff:127.0.0.2") == "127.0.0.2" and peer_key("::1") == "::1"


def test_ipv4_and_ipv6_rules_do_not_match_across_versions_and_unix_peers_pass():
    rules = AccessRules(allow=["0.0.0.0/0"])
    assert rules.permits("10.0.0.1") and not rules.permits("::1")
    assert AccessRules(allow=["::/0"]).check("127.0.0.1") == "not in allow"
    assert rules.permits("") and rules.permits("/run/sockserv.sock")  # no IP: not checked


IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
NETWORKS = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: str(ipaddress.IPv4Network((t[0], t[1]), strict=False)))
NETWORKS6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
    lambda t: str(ipaddress.IPv6Network((t[0], t[1]), strict=False)))


def mapped(network):
    """An IPv4 network written as its IPv4-mapped IPv6 form."""
    net = ipaddress.IPv4Network(network)
    return f"::ffff:{net.network_address}/{net.prefixlen + 96}"


@given(st.lists(NETWORKS, max_size=4), st.lists(NETWORKS, max_size=4), IPV4, st.booleans())
def test_an_ipv4_peer_and_its_mapped_form_get_the_same_verdict(allow, deny, host, mapped_rules):
    if mapped_rules:  # the rules written in IPv4-mapped form mean the same
        allow, deny = [mapped(n) for n in allow], [mapped(n) for n in deny]
    rules = AccessRules(parse_networks(allow), parse_networks(deny))
    assert rules.check(host) == rules.check("::ffff:" + host)
    address = ipaddress.ip_address(host)
    in_deny = any(address in ipaddress.ip_network(n) for n in parse_networks(deny))
    in_allow = any(address in ipaddress.ip_network(n) for n in parse_networks(allow))
    assert rules.permits(host) == (not in_deny and (not allow or in_allow))


@given(st.lists(st.one_of(NETWORKS, NETWORKS6), max_size=6))
def test_parsing_is_idempotent_and_text_equals_list(networks):
    canonical = parse_networks(networks)
    assert parse_networks(",".join(networks)) == canonical
    assert parse_networks(list(canonical)) == canonical


def test_rate_limited_log_logs_once_per_interval_and_counts_the_rest(caplog):
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("sockserv.test"), 1.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="sockserv.test"):
        assert limited.log(logging.INFO, "refused %s", "a")
        assert not limited.log(logging.INFO, "refused %s", "b")
        now[0] += 0.5
        assert not limited.log(logging.INFO, "refused %s", "c")
        now[0] += 0.5
        assert limited.log(logging.INFO, "refused %s", "d")
    assert [r.getMessage() for r in caplog.records] == ["refused a",
                                                        "refused d (2 more suppressed)"]


# -- the settings -----------------------------------------------------------------------------


def test_settings_from_toml_env_and_flags(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('allow = ["127.0.0.0/8", "::1"]\nmax_connections_per_ip = 3\n')
    config = load_config({"config": str(path), "deny": "127.0.0.2"},
                         {"SOCKSERV_MAX_CONNECTIONS_PER_IP": "5"})
    assert config.allow == ("127.0.0.0/8", "::1/128")
    assert config.deny == ("127.0.0.2/32",)
    assert config.max_connections_per_ip == 5
    assert Config().allow == Config().deny == () and Config().max_connections_per_ip == 0
    text = to_toml(config)
    assert 'allow = ["127.0.0.0/8", "::1/128"]  # ' + str(path) in text
    assert 'deny = ["127.0.0.2/32"]  # --deny' in text
    assert "deny = []" in to_toml(Config())


@pytest.mark.parametrize("flags, env, toml, message", [
    ({"deny": "10.0.0.0/8,banana"}, {}, None,
     "deny: 'banana' is not a CIDR network like 10.0.0.0/8 or 2001:db8::/32 (from --deny)"),
    ({}, {"SOCKSERV_ALLOW": "10.0.0.0/40"}, None,
     "allow: '10.0.0.0/40' is not a CIDR network"),
    ({}, {}, 'allow = ["10.0.0.0/8", 5]\n', "allow: 5 is not a CIDR network"),
    ({}, {}, "deny = 5\n", "deny: 5 is not a list of CIDR networks"),
    ({"max_connections_per_ip": "-1"}, {}, None, "max_connections_per_ip: -1 is out of range"),
])
def test_bad_settings_name_the_setting_and_the_entry(tmp_path, flags, env, toml, message):
    if toml is not None:
        path = tmp_path / "s.toml"
        path.write_text(toml)
        flags = {**flags, "config": str(path)}
    with pytest.raises(ConfigError) as info:
        load_config(flags, env)
    assert message in str(info.value)


def test_cli_exits_2_with_one_line_for_a_bad_cidr():
    result = run_cli("echo", "--port", "0", "--allow", "127.0.0.1/8, 300.1.1.1")
    assert result.returncode == 2
    assert result.stderr == ("sockserv: error: allow: '300.1.1.1' is not a CIDR network like "
                             "10.0.0.0/8 or 2001:db8::/32 (from --allow)\n")
    shown = run_cli("echo", "--allow", "127.0.0.1/8", "--print-config")
    assert 'allow = ["127.0.0.0/8"]  # --allow' in shown.stdout


# -- every engine -----------------------------------------------------------------------------


class Greeter(EchoHandler):
    """Says hello first: a refused client must never see it (no handler ran)."""

    def connection_made(self):
        self.conn.write(b"hi\n")


def client_from(source, port, host="127.0.0.1", proto="tcp"):
    """A TCP connection (or a connected UDP socket) from ``source``, a 127/8 address."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def refused(sock):
    """True when the server closed the connection without sending a byte."""
    try:
        return sock.recv(100) == b""
    except ConnectionError:  # reset
        return True


def refused_from(source, port, host="127.0.0.1"):
    """Connect from ``source`` and expect to be refused. The reset can beat connect()
    itself: Python's connect with a timeout reads SO_ERROR after the handshake, and
    finds ECONNRESET (or EPIPE after a FIN and a reset) if the server has already
    accepted and closed the connection."""
    try:
        sock = client_from(source, port, host)
    except ConnectionError:
        return True
    with sock:
        return refused(sock)


def served(sock):
    assert recv_exactly(sock, 3) == b"hi\n"
    sock.sendall(b"ping")
    return recv_exactly(sock, 4) == b"ping"


def udp_answered(sock, payload=b"ping"):
    sock.send(payload)
    return sock.recv(100) == payload


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("rules", [{"deny": "127.0.0.2"}, {"allow": "127.0.0.1/32, ::1"},
                                   {"allow": "127.0.0.0/8", "deny": "127.0.0.2/32"}],
                         ids=["deny", "allow", "deny-wins"])
def test_a_refused_peer_is_closed_or_dropped_before_any_handler_runs(serve, engine, proto,
                                                                     rules):
    server = serve(engine, Greeter if proto == "tcp" else EchoHandler, proto=proto, **rules)
    port = server.server_address[1]
    if proto == "tcp":
        assert refused_from("127.0.0.2", port)
        with client_from("127.0.0.1", port) as good:
            assert served(good)
    else:
        with client_from("127.0.0.2", port, proto=proto) as bad, \
                client_from("127.0.0.1", port, proto=proto) as good:
            bad.send(b"let me in")
            wait_for(lambda: server.stats.denied == 1, what="the datagram to be denied")
            assert udp_answered(good)
            bad.setblocking(False)
            with pytest.raises(BlockingIOError):
                bad.recv(100)  # nothing came back to the denied peer
    wait_for(lambda: server.stats.denied == 1, what="the refusal to be counted")
    assert server.stats.connections_total == 1


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_ipv4_mapped_peers_of_an_ipv6_socket_match_ipv4_rules(serve, engine, proto):
    server = serve(engine, Greeter if proto == "tcp" else EchoHandler, proto=proto,
                   host="::ffff:127.0.0.1", deny="127.0.0.2/32")
    assert server.address_family == socket.AF_INET6
    port = server.server_address[1]
    if proto == "tcp":
        assert refused_from("127.0.0.2", port)
        with client_from("127.0.0.1", port) as good:
            assert served(good)
    else:
        with client_from("127.0.0.2", port, proto=proto) as bad, \
                client_from("127.0.0.1", port, proto=proto) as good:
            bad.send(b"x")
            wait_for(lambda: server.stats.denied == 1, what="the datagram to be denied")
            assert udp_answered(good)


class ClassicEcho(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


@pytest.mark.parametrize("handler", [Greeter, ClassicEcho], ids=["sockserv", "classic"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_max_connections_per_ip_counts_live_connections_and_releases_them(serve, engine,
                                                                          handler):
    server = serve(engine, handler, max_connections_per_ip=2)
    port = server.server_address[1]

    def check(sock):
        if handler is Greeter:
            return served(sock)
        sock.sendall(b"line\n")
        return recv_exactly(sock, 5) == b"line\n"

    first, second = client_from("127.0.0.1", port), client_from("127.0.0.1", port)
    assert check(first) and check(second)
    assert refused_from("127.0.0.1", port)
    other = client_from("127.0.0.2", port)  # another address has its own count
    assert check(other)
    assert server.connections_per_ip() == {"127.0.0.1": 2, "127.0.0.2": 1}
    assert server.stats.refused_per_ip == 1
    hangup(first)
    wait_for(lambda: server.connections_per_ip().get("127.0.0.1") == 1,
             what="the closed connection to be uncounted")
    fourth = client_from("127.0.0.1", port)
    assert check(fourth)
    for sock in (second, other, fourth):
        hangup(sock)
    wait_for(lambda: server.connections_per_ip() == {}, what="every connection to be uncounted")


def test_refusals_are_logged_at_most_once_a_second(serve, caplog):
    server = serve("select", Greeter, deny="127.0.0.2")
    port = server.server_address[1]
    with caplog.at_level(logging.INFO, logger="sockserv"):
        start = time.monotonic()
        for _ in range(50):
            assert refused_from("127.0.0.2", port)
        elapsed = time.monotonic() - start
        wait_for(lambda: server.stats.denied == 50, what="50 refusals counted")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert lines[0].startswith("refused connection from 127.0.0.2:")
    assert lines[0].endswith(": denied by 127.0.0.2/32")
    assert 1 <= len(lines) <= 2 + elapsed  # one per second at most (plus the first)


def test_an_inetd_connection_is_checked_too():
    config = Config(port=0, deny=("127.0.0.2",))
    server = ThreadingTCPServer(("127.0.0.1", 0), Greeter, False, config=config)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with client_from("127.0.0.2", listener.getsockname()[1]) as client:
            request, address = listener.accept()  # the handshake is done: no race here
            server.serve_connection(request, address)  # returns at once: refused
            assert refused(client)
    assert server.stats.denied == 1 and server.stats.connections_total == 0
    server.server_close()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_rules_and_limits_reload_on_sighup(cli, tmp_path, engine):
    path = tmp_path / "rules.toml"
    path.write_text("deny = []\n")
    server = cli("serve", "tests.test_access:Greeter", "--port", "0", "--engine", engine,
                 "--config", str(path))
    port = server.wait_serving()
    with client_from("127.0.0.2", port) as sock:
        assert served(sock)
        path.write_text('deny = ["127.0.0.2/32"]\nmax_connections_per_ip = 1\n')
        server.signal(signal.SIGHUP)
        server.wait_line(r"reloaded config \(changed: deny, max_connections_per_ip\)")
        assert refused_from("127.0.0.2", port)
        server.wait_line(r"refused connection from 127\.0\.0\.2:\d+: denied by 127\.0\.0\.2/32")
        with client_from("127.0.0.1", port) as one:
            assert served(one)
            assert refused_from("127.0.0.1", port)
        server.wait_line(r"refused connection from 127\.0\.0\.1:\d+: over "
                         r"max_connections_per_ip \(1\)")
        sock.sendall(b"still here")  # a connection opened before the reload stays open
        assert recv_exactly(sock, 10) == b"still here"
    path.write_text('allow = ["127.0.0.0/8"]\n')
    server.signal(signal.SIGHUP)
    server.wait_line(r"reloaded config \(changed: allow, deny, max_connections_per_ip\)")
    with client_from("127.0.0.2", port) as sock:
        assert served(sock)


def test_a_udp_denial_on_the_select_engine_costs_no_peer(serve):
    server = serve("select", EchoHandler, proto="udp", deny="127.0.0.2", max_connections=1)
    port = server.server_address[1]
    with client_from("127.0.0.2", port, proto="udp") as bad:
        for _ in range(5):
            bad.send(b"x")
        wait_for(lambda: server.stats.denied == 5, what="5 datagrams denied")
    with udp_client() as good:  # the one peer slot is still free
        good.sendto(b"ok", server.server_address)
        assert good.recv(10) == b"ok"
    assert server.live_count() == 1


def test_unrestricted_server_echoes_from_any_loopback_address(serve):
    server = serve("select", EchoHandler)
    with client_from("127.0.0.3", server.server_address[1]) as sock:
        sock.sendall(b"abc")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"abc"
