"""The push bus across nodes through a real redis-server: RESP (pure, with hypothesis),
push nodes as `python -m sockserv push` processes (select, workers, fork) with real
subscribers and publishers, passwords, TLS, Redis missing at start and lost mid-run,
bad URLs."""

from __future__ import annotations

import re
import signal
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserv import Config, Hub, PushHandler
from sockserv.bus import RedisBus, parse_url
from sockserv.push import Ticker
from sockserv.resp import Parser, ProtocolError, ReplyError, encode_command

from .conftest import run_cli, wait_for
from .test_push import Client
from .test_systemd import NotifySocket
from .test_tls import pki  # noqa: F401  (a fixture)

# -- RESP (pure) ---------------------------------------------------------------------------


def test_encode_command():
    assert encode_command("PUBLISH", b"sockserv:0", b"a b\n") == \
        b"*3\r\n$7\r\nPUBLISH\r\n$10\r\nsockserv:0\r\n$4\r\na b\n\r\n"
    assert encode_command("SELECT", 12) == b"*2\r\n$6\r\nSELECT\r\n$2\r\n12\r\n"
    assert encode_command("SET", "k", "é") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(ValueError):
        encode_command()
    with pytest.raises(TypeError):
        encode_command("SET", 1.5)


REPLIES = (b"+OK\r\n-WRONGPASS invalid username-password pair\r\n:42\r\n:-1\r\n$5\r\nhe\r\no\r\n"
           b"$0\r\n\r\n$-1\r\n*-1\r\n*0\r\n*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$3\r\nx y\r\n"
           b"*2\r\n*1\r\n:1\r\n+PONG\r\n")
PARSED = ["OK", ReplyError("WRONGPASS invalid username-password pair"), 42, -1, b"he\r\no", b"",
          None, None, [], [b"message", b"c", b"x y"], [[1], "PONG"]]


def test_parser_reads_every_reply_type():
    assert Parser().feed(REPLIES) == PARSED


def test_parser_waits_for_the_rest_of_a_reply():
    parser = Parser()
    assert parser.feed(b"*3\r\n$7\r\nmessage\r\n$1\r\nc") == []
    assert parser.pending > 0
    assert parser.feed(b"\r\n$3\r\nx y\r\n:7") == [[b"message", b"c", b"x y"]]
    assert parser.feed(b"\r\n") == [7]
    assert parser.pending == 0


@pytest.mark.parametrize("data", [b"?what\r\n", b":12a\r\n", b"$-2\r\n", b"$3\r\nabcde\r\n",
                                  b"*x\r\n", b": 1\r\n", b"$+3\r\nabc\r\n"])
def test_parser_rejects_what_is_not_resp(data):
    with pytest.raises(ProtocolError):
        Parser().feed(data)


line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                    max_size=20)  # a simple string or an error: one line
resp_values = st.recursive(
    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.binary(max_size=40), line_text,
              line_text.map(ReplyError)),
    lambda children: st.lists(children, max_size=5), max_leaves=20)


def encode_reply(value):
    """A reply as Redis would send it (the inverse of the parser, for the test)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, ReplyError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, str):
        return b"+" + value.encode() + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(encode_reply(item) for item in value)


@settings(max_examples=300, deadline=None)
@given(st.lists(resp_values, max_size=8), st.data())
def test_any_split_gives_the_same_replies(values, data):
    stream = b"".join(encode_reply(value) for value in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    parser = Parser()
    replies = []
    start = 0
    for cut in [*cuts, len(stream)]:
        replies += parser.feed(stream[start:cut])
        start = cut
    assert replies == values
    assert parser.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_fails_otherwise_on_garbage(data):
    try:
        Parser().feed(data)
    except ProtocolError:
        pass


# -- URLs and config -----------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("redis://h", (False, "h", 6379, 0, None, None)),
    ("redis://h:7000/3", (False, "h", 7000, 3, None, None)),
    ("rediss://:p%40ss%3A@h/", (True, "h", 6379, 0, None, "p@ss:")),
    ("redis://alice:pw@[::1]:6380/1", (False, "::1", 6380, 1, "alice", "pw")),
])
def test_parse_url(url, expected):
    assert tuple(parse_url(url)) == expected


@pytest.mark.parametrize("url, fragment", [
    ("http://h", "is not a redis:// or rediss:// URL"),
    ("redis://", "names no host"),
    ("redis://h:0", "bad port"),
    ("redis://h:65536", "bad port"),
    ("redis://h:x", "bad port"),
    ("redis://h/x", "bad database number"),
    ("redis://h/1?ssl=1", "query strings"),
])
def test_bad_bus_url_exits_2_with_one_line(url, fragment):
    result = run_cli("push", "--port", "0", "--bus", url)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockserv: error: bus: "), lines
    assert fragment in lines[0] and "(from --bus)" in lines[0]


def test_a_password_in_a_bad_url_is_not_shown():
    result = run_cli("push", "--port", "0", "--bus", "redis://:hunter2@h:99999")
    assert result.returncode == 2 and "hunter2" not in result.stderr
    assert "redis://***@h:99999" in result.stderr


def test_ticks_stay_on_their_node():
    """Each node ticks for its own subscribers: a tick goes to the relay, not to the bus."""

    class Recorder:
        def __init__(self):
            self.lines = []

        def publish(self, line):
            self.lines.append(line)

    class Loop:
        def __init__(self):
            self.timers = self

        def call_at(self, when, fn):
            self.tick = fn

    hub, bus, forwarded = Hub(), Recorder(), []
    hub.bus, hub.forward = bus, forwarded.append
    loop = Loop()
    loop.hub = hub
    Ticker(loop, 1.0).start()
    loop.tick()
    assert len(forwarded) == 1 and forwarded[0].startswith(b"MSG time ") and bus.lines == []
    hub.publish("news", "hi")
    assert bus.lines == [b"MSG news hi\n"] and forwarded[1:] == [b"MSG news hi\n"]


# -- nodes -----------------------------------------------------------------------------------


@pytest.fixture
def notify_path(tmp_path):
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


NODE_PORT = re.compile(r"(?:serving push on|worker\(s\) on) tcp 127\.0\.0\.1:(\d+)")


class Node:
    """A `python -m sockserv push --bus URL` process and its port."""

    def __init__(self, cli, url, *args, env=None, connected=True):
        self.server = cli("push", "--port", "0", "--bus", url, "--shutdown-timeout", "3", *args,
                          env=env)
        line = self.server.wait_line(NODE_PORT.pattern)
        self.port = int(NODE_PORT.search(line).group(1))
        if "--workers" in args:
            self.server.wait_line(r"supervisor \d+: \d+ worker\(s\) serving")
        if connected:
            self.server.wait_line(r"bus: connected to ")

    def client(self):
        return Client(self.port)

    def subscriber(self, channel="news"):
        client = self.client()
        assert client.command(b"SUB " + channel.encode()) == b"+OK"
        return client

    def publish(self, *payloads, channel="news"):
        with self.client() as client:
            for payload in payloads:
                assert client.command(b"PUB %s %s" % (channel.encode(), payload.encode())) \
                    == b"+OK"

    def bus_lines(self):
        """Every log line about the bus, once the node has exited."""
        return [line for line in self.stop() if "bus:" in line]

    def stop(self):
        """SIGTERM, check it exits 0; returns every stderr line."""
        self.server.signal(signal.SIGTERM)
        assert self.server.wait() == 0
        lines = list(self.server.seen)
        while (line := self.server.lines.get(timeout=10)) is not None:
            lines.append(line)
        assert not any("Traceback" in line for line in lines), lines
        return lines


def messages(client, count):
    """The next ``count`` MSG payloads of a subscriber."""
    return [client.msg().split(b" ", 2)[2].decode() for _ in range(count)]


def round_trip(publisher, subscriber, payload):
    """``payload`` published on one node reaches a subscriber on another."""
    publisher.publish(payload)
    return messages(subscriber, 1) == [payload]


def check_every_message_once_in_order(publishers, subscribers, per_publisher):
    """Each publisher (name -> client) pipelines ``per_publisher`` PUBs on channel
    ``news``, then a last one; every subscriber gets all of them exactly once and in
    order per publisher (the last message catches a late copy of an earlier one)."""
    for name, client in publishers.items():  # every PUB sent before any reply is read
        for seq in range(per_publisher):
            client.send(f"PUB news {name}:{seq}".encode())
    for client in publishers.values():
        assert all(client.reply() == b"+OK" for _ in range(per_publisher))
    expected = len(publishers) * per_publisher
    got = [messages(subscriber, expected) for subscriber in subscribers]
    # A last message from each publisher: a copy of an earlier one, if any, would come
    # before it (the order per publisher holds on every path).
    for name, client in publishers.items():
        assert client.command(f"PUB news {name}:last".encode()) == b"+OK"
    for subscriber, received in zip(subscribers, got, strict=True):
        received += messages(subscriber, len(publishers))
        for name in publishers:
            assert [m.split(":")[1] for m in received if m.split(":")[0] == name] == \
                [*map(str, range(per_publisher)), "last"], (name, received)
        assert len(received) == expected + len(publishers)


def bus_clients(redis):
    """How many connections other than ours the Redis server holds."""
    return int(redis.info("clients")["connected_clients"]) - 1


def test_every_subscriber_on_every_node_gets_every_message_once_in_order(cli, redis_server):
    redis = redis_server()
    url = redis.url()
    nodes = [Node(cli, url), Node(cli, url, "--workers", "2"), Node(cli, url, "--engine", "fork")]
    # One bus per node: two connections each, whatever its workers and children.
    assert bus_clients(redis) == 2 * len(nodes)
    subscribers = [node.subscriber() for node in nodes for _ in range(3)]
    per_publisher = 20
    publishers = {f"{i}.{j}": node.client() for i, node in enumerate(nodes) for j in range(2)}
    check_every_message_once_in_order(publishers, subscribers, per_publisher)
    assert bus_clients(redis) == 2 * len(nodes)  # the fork engine's children hold none
    for client in [*subscribers, *publishers.values()]:
        client.close()
    for node in nodes:
        node.stop()
    wait_for(lambda: bus_clients(redis) == 0, what="the nodes to close their bus connections")


def test_password_from_the_url_and_from_the_environment(cli, redis_server):
    password = "s3cret:@/ word"
    redis = redis_server(password=password)
    from_url = Node(cli, redis.url(password=password))
    from_env = Node(cli, redis.url(), env={"SOCKSERV_BUS_PASSWORD": password})
    a, b = from_url.subscriber(), from_env.subscriber()
    assert round_trip(from_url, b, "from the url node")
    assert messages(a, 1) == ["from the url node"]  # its own node's, delivered locally once
    assert round_trip(from_env, a, "from the env node")
    assert messages(b, 1) == ["from the env node"]
    a.close()
    b.close()
    assert password not in "\n".join(from_url.stop() + from_env.stop())


def failed_logins(redis):
    """AUTH failures Redis saw (its ACL LOG merges alike entries and counts them)."""
    entries = [dict(zip(entry[::2], entry[1::2], strict=True))
               for entry in redis.command("ACL", "LOG")]
    return sum(e[b"count"] for e in entries if e[b"reason"] == b"auth")


def test_a_wrong_password_logs_one_line_and_the_node_serves_locally(cli, redis_server):
    redis = redis_server(password="right")
    node = Node(cli, redis.url(password="wrong"), connected=False)
    line = node.server.wait_line(r"bus: ")
    assert re.search(r"bus: cannot use redis://127\.0\.0\.1:\d+/0 \(Redis said: WRONGPASS .*\); "
                     r"serving this node's subscribers only and retrying", line), line
    subscriber = node.subscriber()
    assert round_trip(node, subscriber, "local")
    # It keeps trying (backing off), without logging each attempt.
    wait_for(lambda: failed_logins(redis) >= 4, what="retries")
    subscriber.close()
    lines = node.bus_lines()
    assert lines == [line], lines


def test_redis_missing_at_start_then_started(cli, redis_server, notify_path):
    redis = redis_server(start=False)
    node = Node(cli, redis.url(), env=notify_path.env, connected=False)
    node.server.wait_line(r"bus: cannot use redis://127\.0\.0\.1:\d+/0 \(Connection refused\)")
    assert notify_path.wait_for("READY")["STATUS"].endswith(", 0 subscribers, bus down")
    subscriber = node.subscriber()
    assert round_trip(node, subscriber, "local 1")
    node.publish("local 2")
    assert messages(subscriber, 1) == ["local 2"]
    redis.start()
    status = wait_status(notify_path, "bus up")
    assert status.endswith(", 1 subscribers, bus up (2 lost)"), status
    node.server.wait_line(r"bus: connected again to redis://127\.0\.0\.1:\d+/0; 2 message\(s\) "
                          r"published meanwhile reached this node only")
    other = Node(cli, redis.url())
    assert round_trip(other, subscriber, "across")
    subscriber.close()
    assert len(node.bus_lines()) == 2


def wait_status(notify, text, timeout=15.0):
    """The next STATUS= that contains ``text`` (the refreshes in between are skipped)."""
    while text not in (status := notify.wait_for("STATUS", timeout=timeout)["STATUS"]):
        pass
    return status


def test_redis_lost_mid_run_then_back(cli, redis_server, notify_path):
    redis = redis_server()
    a, b = Node(cli, redis.url()), Node(cli, redis.url(), "--workers", "2", env=notify_path.env)
    sub_a, sub_b = a.subscriber(), b.subscriber()
    wait_status(notify_path, "bus up")
    assert round_trip(a, sub_b, "before")
    assert messages(sub_a, 1) == ["before"]
    redis.stop()
    for node in (a, b):
        node.server.wait_line(r"bus: lost redis://127\.0\.0\.1:\d+/0 \(.*\); until it is back, "
                              r"messages reach this node's subscribers only")
    a.publish("a1", "a2", "a3")
    b.publish("b1", "b2")
    assert messages(sub_a, 3) == ["a1", "a2", "a3"]  # local delivery goes on
    assert messages(sub_b, 2) == ["b1", "b2"]
    assert wait_status(notify_path, "bus down").startswith("push on tcp 127.0.0.1:")
    redis.start()
    a.server.wait_line(r"bus: connected again .*; 3 message\(s\) published meanwhile")
    b.server.wait_line(r"bus: connected again .*; 2 message\(s\) published meanwhile")
    status = wait_status(notify_path, "bus up")
    assert status.endswith(": 2 workers, bus up (2 lost)"), notify_path.messages
    # What was lost stays lost (at most once): the next message across is the new one.
    assert round_trip(a, sub_b, "after a")
    assert messages(sub_a, 1) == ["after a"]
    assert round_trip(b, sub_a, "after b")
    assert messages(sub_b, 1) == ["after b"]
    sub_a.close()
    sub_b.close()


def test_rediss_with_a_certificate_from_ssl_cert_file(cli, redis_server, pki):  # noqa: F811
    redis = redis_server(tls=(pki.server_cert, pki.server_key, pki.ca))
    env = {"SSL_CERT_FILE": pki.ca}
    a, b = Node(cli, redis.url(), env=env), Node(cli, redis.url(), "--engine", "thread", env=env)
    sub_b = b.subscriber()
    assert round_trip(a, sub_b, "over TLS")
    sub_b.close()
    untrusting = Node(cli, redis.url(), connected=False)
    untrusting.server.wait_line(r"bus: cannot use rediss://localhost:\d+/0 \(.*certificate "
                                r"verify failed")


# -- in process: stats, a database number, closing -------------------------------------------


def test_stats_count_what_crosses_and_the_database_names_the_channel(serve, redis_server):
    redis = redis_server()
    server = serve("select", PushHandler, bus=redis.url(db=5))
    wait_for(lambda: server.stats.snapshot()["bus"] == "up", what="the bus")
    assert server.bus.channel == b"sockserv:5"
    with Client(server.server_address[1]) as publisher:
        assert publisher.command(b"PUB news one") == b"+OK"
        assert publisher.command(b"PUB news two") == b"+OK"
    wait_for(lambda: server.stats.snapshot()["bus_sent"] == 2, what="bus_sent")
    # Another node's message, as it travels on the Redis channel:
    with Client(server.server_address[1]) as subscriber:
        assert subscriber.command(b"SUB news") == b"+OK"
        assert redis.command("PUBLISH", "sockserv:5", b"othernode MSG news three\n") == 1
        assert redis.command("PUBLISH", "sockserv:5", b"othernode junk\n") == 1
        assert redis.command("PUBLISH", "sockserv:5", b"othernode MSG news four\n") == 1
        assert subscriber.msg() == b"MSG news three"
        assert subscriber.msg() == b"MSG news four"
    stats = server.hub.stats()
    assert (stats["bus"], stats["bus_sent"], stats["bus_received"], stats["bus_lost"]) == \
        ("up", 2, 2, 0)
    bus = server.bus
    server.shutdown()
    server.server_close()
    assert bus.state == "off" and not any(t.is_alive() for t in bus._threads)
    wait_for(lambda: bus_clients(redis) == 0, what="the bus connections to close")


def test_without_a_bus_nothing_starts(serve):
    server = serve("select", PushHandler)
    assert server.bus is None and server.hub.bus is None
    assert "bus" not in server.stats.snapshot() and "bus" not in server.hub.stats()


def test_a_bus_closed_while_connecting_stops_at_once():
    """close() ends the threads even while Redis does not answer (a listener that
    never accepts: the connection stays in its backlog)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)

        class Loop:
            def call_soon_threadsafe(self, fn, *args):
                pass

        bus = RedisBus(f"redis://127.0.0.1:{silent.getsockname()[1]}", Loop(), print)
        bus.start()
        bus.publish(b"MSG news queued\n")
        bus.close()
        assert not any(t.is_alive() for t in bus._threads)
        assert bus.state == "off"


class CallingLoop:
    """A loop stand-in that runs each call at once, in the calling (bus) thread."""

    def __init__(self):
        self.delivered = []

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


def test_an_idle_publisher_connection_pings(redis_server):
    redis = redis_server()

    def pings():
        stats = redis.info("commandstats").get("cmdstat_ping", "calls=0")
        return int(stats.split(",")[0].split("=")[1])

    before = pings()
    loop = CallingLoop()
    bus = RedisBus(redis.url(), loop, loop.delivered.append)
    bus.ping_interval = 0.05
    bus.start()
    try:
        wait_for(lambda: pings() >= before + 4, what="idle PINGs")  # 1 at connect, then idle
        assert bus.state == "up" and bus.lost == 0
        redis.command("PUBLISH", "sockserv:0", b"other MSG news x\n")
        wait_for(lambda: loop.delivered == [b"MSG news x\n"], what="the message")
    finally:
        bus.close()


def test_echo_ignores_the_bus(cli, redis_server):
    redis = redis_server()
    server = cli("echo", "--port", "0", "--bus", redis.url())
    server.wait_line(r"bus: ignored, echo does not use the push hub")
    assert bus_clients(redis) == 0


def test_config_keeps_the_url():
    config = Config(bus="redis://h:1/2", bus_password="x")
    assert config.bus == "redis://h:1/2" and config.bus_password == "x"
