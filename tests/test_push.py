"""The push service with real sockets: every engine x TCP/UDP, across forked children,
slow consumers, tick, and the `push`, `publish` and `subscribe` commands."""

from __future__ import annotations

import datetime
import os
import queue
import random
import signal
import socket
import threading
from collections import deque

import pytest

from sockserv import Hub, PushHandler
from sockserv.push import MAX_DATAGRAM, handle_line
from sockserv.pushclient import PushClient
from sockserv.relay import Relay

from .conftest import (
    ENGINE_NAMES,
    PROTOS,
    children_of,
    hangup,
    recv_exactly,
    recv_until_eof,
    run_cli,
    wait_for,
)

EVERY_ENGINE_AND_PROTO = [(engine, proto) for engine in ENGINE_NAMES for proto in PROTOS]


class Client(PushClient):
    """A push client for tests: ``command`` returns the reply and keeps the MSG lines
    met on the way for ``msg``; ``close`` hangs up for good (see conftest.hangup)."""

    def __init__(self, port, proto="tcp"):
        super().__init__("127.0.0.1", port, proto, timeout=10)
        self.msgs: deque[bytes] = deque()

    def command(self, line):
        self.send(line)
        return self.reply(self.msgs.append)

    def msg(self):
        if self.msgs:
            return self.msgs.popleft()
        line = self.read_line()
        assert line is not None and line.startswith(b"MSG "), line
        return line

    def close(self):
        hangup(self.sock)


@pytest.fixture
def push(serve):
    """``push(engine, proto="tcp", **settings)``: a running push server and a client factory."""
    clients = []

    def start(engine, proto="tcp", **settings):
        server = serve(engine, PushHandler, proto=proto, **settings)

        def connect():
            client = Client(server.server_address[1], proto)
            clients.append(client)
            return client

        server.connect = connect
        return server

    yield start
    for client in clients:
        client.close()


# -- the protocol over every engine and transport ----------------------------------------


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_every_command_gets_its_reply_and_the_connection_stays_open(push, engine, proto):
    client = push(engine, proto).connect()
    for line, reply in [
        (b"PING", b"+PONG"),
        (b"ping hello world", b"+PONG hello world"),
        (b"SUB news", b"+OK"),
        (b"sub news", b"+OK"),
        (b"UNSUB news", b"+OK"),
        (b"UNSUB never", b"+OK"),
        (b"SUB bad!", b"-ERR bad channel"),
        (b"SUB", b"-ERR usage: SUB <channel>"),
        (b"UNSUB a b", b"-ERR usage: UNSUB <channel>"),
        (b"PUB news", b"-ERR usage: PUB <channel> <payload>"),
        (b"PUB " + b"c" * 129 + b" x", b"-ERR bad channel"),
        (b"HELLO", b"-ERR unknown command"),
        (b"", b"-ERR empty line"),
        (b"PUB nobody listening", b"+OK"),
        (b"PING still open", b"+PONG still open"),
    ]:
        assert client.command(line) == reply, line
    assert not client.msgs


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_messages_reach_every_subscriber_in_publish_order(push, engine, proto):
    server = push(engine, proto)
    s1, s2, s3, p1, p2 = (server.connect() for _ in range(5))
    for client, channels in ((s1, [b"a"]), (s2, [b"a", b"b"]), (s3, [b"b"]), (p1, [b"a"])):
        for channel in channels:
            assert client.command(b"SUB " + channel) == b"+OK"
    count = 100 if proto == "tcp" else 20  # UDP: stay well inside the receive buffers
    lines = {p1: [b"PUB a p1:%d" % i for i in range(count)],
             p2: [b"PUB %s p2:%d" % (b"ab"[i % 2:i % 2 + 1], i) for i in range(count)]}
    if proto == "tcp":  # pipelined: both publishers at once, replies read afterwards
        for publisher, publishing in lines.items():
            publisher.sock.sendall(b"".join(line + b"\n" for line in publishing))
        for publisher in lines:
            assert [publisher.reply(publisher.msgs.append) for _ in range(count)] == \
                [b"+OK"] * count
    else:
        for one, two in zip(lines[p1], lines[p2], strict=True):
            assert p1.command(one) == b"+OK"
            assert p2.command(two) == b"+OK"
    expected = {  # per subscriber: the payloads it must get, in order, per publisher
        s1: ([f"p1:{i}" for i in range(count)], [f"p2:{i}" for i in range(0, count, 2)]),
        s2: ([f"p1:{i}" for i in range(count)], [f"p2:{i}" for i in range(count)]),
        s3: ([], [f"p2:{i}" for i in range(1, count, 2)]),
        p1: ([f"p1:{i}" for i in range(count)], [f"p2:{i}" for i in range(0, count, 2)]),
    }
    for client, (from_p1, from_p2) in expected.items():
        got = [client.msg().decode() for _ in range(len(from_p1) + len(from_p2))]
        payloads = [line.split(" ", 2)[2] for line in got]
        assert [p for p in payloads if p.startswith("p1:")] == from_p1
        assert [p for p in payloads if p.startswith("p2:")] == from_p2
        for line in got:  # and each on the channel it was published to
            channel, payload = line.split(" ", 2)[1:]
            assert channel == ("a" if payload.startswith("p1") or
                               int(payload[3:]) % 2 == 0 else "b"), line
        assert client.command(b"PING") == b"+PONG" and not client.msgs  # nothing more


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_unsubscribe_stops_delivery_on_that_channel_only(push, engine, proto):
    server = push(engine, proto)
    subscriber, publisher = server.connect(), server.connect()
    for line in (b"SUB a", b"SUB b", b"UNSUB a"):
        assert subscriber.command(line) == b"+OK"
    assert publisher.command(b"PUB a not for you") == b"+OK"
    assert publisher.command(b"PUB b for you") == b"+OK"
    assert subscriber.msg() == b"MSG b for you"  # a's message would have come first


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_closed_subscriber_is_unsubscribed(push, engine):
    server = push(engine)
    subscriber, publisher = server.connect(), server.connect()
    assert subscriber.command(b"SUB gone") == b"+OK"
    subscriber.close()
    wait_for(lambda: server.live_count() == 1, what="the subscriber's end")
    if engine != "fork":  # a forked child's hub is its own: it left with the child
        wait_for(lambda: server.hub.stats()["subscriptions"] == 0, what="the unsubscription")
    assert publisher.command(b"PUB gone x") == b"+OK"


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_a_line_too_long_is_answered_and_closes(push, engine, proto):
    server = push(engine, proto, max_line=100)
    client = server.connect()
    assert client.command(b"PUB c " + b"x" * 94) == b"+OK"  # exactly 100: fine
    client.send(b"PUB c " + b"x" * 95)
    assert client.read_line() == b"-ERR line too long"
    if proto == "tcp":
        assert client.read_line() is None  # closed


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_binary_garbage_gets_one_error_per_line_and_the_connection_stays_open(
        push, engine, proto):
    client = push(engine, proto).connect()
    rng = random.Random(4)
    lines = [rng.randbytes(rng.randint(1, 200)).translate(None, b"\r\n") or b"\x00"
             for _ in range(30)]
    if proto == "tcp":
        client.sock.sendall(b"\n".join(lines) + b"\n")
        replies = [client.reply() for _ in lines]
    else:
        replies = [client.command(line) for line in lines]
    assert replies == [handle_line(line)[0].rstrip(b"\n") for line in lines]
    assert all(reply.startswith(b"-ERR ") for reply in replies)
    assert client.command(b"PING after garbage") == b"+PONG after garbage"


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_tick_publishes_the_time_to_channel_time(push, engine, proto):
    client = push(engine, proto, tick=0.05).connect()
    assert client.command(b"SUB time") == b"+OK"
    stamps = []
    for _ in range(2):
        verb, channel, stamp = client.msg().decode().split(" ")
        assert (verb, channel) == ("MSG", "time")
        parsed = datetime.datetime.fromisoformat(stamp)
        assert stamp.endswith("Z") and parsed.utcoffset() == datetime.timedelta(0)
        stamps.append(parsed)
    assert stamps[0] < stamps[1]


@pytest.mark.parametrize("engine, proto", EVERY_ENGINE_AND_PROTO)
def test_server_publish_works_from_any_thread(push, engine, proto):
    server = push(engine, proto)
    client = server.connect()
    assert client.command(b"SUB news") == b"+OK"
    thread = threading.Thread(target=server.publish, args=("news", "from a thread"))
    thread.start()
    thread.join(10)
    assert client.msg() == b"MSG news from a thread"
    server.publish(b"news", "caf\u00e9")
    assert client.msg() == "MSG news caf\u00e9".encode()
    with pytest.raises(ValueError):
        server.publish("bad channel", "x")
    with pytest.raises(ValueError):
        server.publish("news", "two\nlines")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_udp_message_too_long_for_a_datagram_is_refused_whole(push, engine):
    server = push(engine, "udp")
    subscriber, publisher = server.connect(), server.connect()
    assert subscriber.command(b"SUB big") == b"+OK"
    fits = b"PUB big " + b"x" * (MAX_DATAGRAM - len(b"MSG big \n"))
    too_long = fits + b"y"  # a 65507-byte datagram whose MSG line would be 65508 bytes
    assert len(too_long) == MAX_DATAGRAM
    for datagram, reply in ((too_long, b"-ERR message too long for one datagram"),
                            (fits, b"+OK")):
        publisher.sock.send(datagram)  # no "\n": a datagram is a whole line
        assert publisher.reply() == reply
    assert subscriber.msg() == b"MSG" + fits[3:]  # the one that fits, nothing before it
    with pytest.raises(ValueError, match="datagram"):
        server.publish("big", b"x" * MAX_DATAGRAM)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_udp_subscription_ends_when_the_peer_lease_expires(push, engine):
    server = push(engine, "udp", udp_idle=0.3)
    subscriber = server.connect()
    assert subscriber.command(b"SUB lease") == b"+OK"
    wait_for(lambda: server.live_count() == 0, what="the silent peer to expire")
    publisher = server.connect()
    assert publisher.command(b"PUB lease after expiry") == b"+OK"
    assert subscriber.command(b"PING") == b"+PONG"  # a new peer: nothing was delivered
    assert not subscriber.msgs


# -- slow consumers -----------------------------------------------------------------------


WINDOWS, PER_WINDOW, PAYLOAD = 10, 20, 1000


@pytest.mark.parametrize("policy", ["disconnect", "drop"])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_one_slow_consumer_never_holds_back_a_hundred_fast_ones(push, engine, policy):
    server = push(engine, max_buffer=64 * 1024, slow_consumer=policy, max_connections=200)
    # Small kernel buffers for the connections, so max_buffer (not the kernel) decides.
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    port = server.server_address[1]
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(10)
    slow.connect(("127.0.0.1", port))
    try:
        slow.sendall(b"SUB feed\n")
        assert recv_exactly(slow, 4) == b"+OK\n"  # from here on it reads nothing
        fast = [server.connect() for _ in range(100)]
        for client in fast:
            assert client.command(b"SUB feed") == b"+OK"
        publisher = server.connect()
        total = WINDOWS * PER_WINDOW
        pad = b"x" * PAYLOAD
        for window in range(WINDOWS):  # each window must reach all 100 before the next
            numbers = range(window * PER_WINDOW, (window + 1) * PER_WINDOW)
            publisher.sock.sendall(b"".join(b"PUB feed %d %s\n" % (i, pad) for i in numbers))
            assert [publisher.reply() for _ in numbers] == [b"+OK"] * PER_WINDOW
            for client in fast:
                assert [client.msg() for _ in numbers] == \
                    [b"MSG feed %d %s" % (i, pad) for i in numbers]
        if policy == "disconnect":
            lines = recv_until_eof(slow).split(b"\n")  # it was closed
            assert lines.pop() == b""
            if lines[-1] == b"-ERR slow consumer":
                lines.pop()
            got = len(lines)
            assert lines == [b"MSG feed %d %s" % (i, pad) for i in range(got)]
            expected = {"slow_disconnected": 1, "slow_dropped": 0}
        else:
            slow.sendall(b"PING end\n")
            data = b""
            while not data.endswith(b"+PONG end\n"):
                chunk = slow.recv(65536)
                assert chunk, "the slow consumer was closed"
                data += chunk
            lines = data.split(b"\n")[:-2]
            got = len(lines)
            numbers = [int(line.split(b" ")[2]) for line in lines]
            assert numbers == sorted(set(numbers))  # in order, no repeats
            assert lines == [b"MSG feed %d %s" % (i, pad) for i in numbers]
            expected = {"slow_disconnected": 0, "slow_dropped": total - got}
        assert 0 < got < total
        expected["delivered"] = 100 * total + got
        hangup(slow)
        for client in (*fast, publisher):
            client.close()

        def counters():
            return {name: server.stats.snapshot()[name] for name in expected}

        try:  # a forked child reports its counters to the parent as it exits
            wait_for(lambda: counters() == expected, what="the counters")
        except AssertionError:
            assert counters() == expected
    finally:
        hangup(slow)


# -- across forked children -------------------------------------------------------------


def test_concurrent_publishers_in_forked_children_keep_their_order(push):
    server = push("fork")
    subscribers = [server.connect() for _ in range(5)]
    for client in subscribers:
        assert client.command(b"SUB many") == b"+OK"
    publishers = [server.connect() for _ in range(4)]
    count = 200

    def publish(index, client):
        client.sock.sendall(b"".join(b"PUB many %d:%d\n" % (index, i) for i in range(count)))
        assert [client.reply() for _ in range(count)] == [b"+OK"] * count

    threads = [threading.Thread(target=publish, args=pair) for pair in enumerate(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for client in subscribers:
        seen = {index: [] for index in range(len(publishers))}
        for _ in range(count * len(publishers)):
            index, number = client.msg().split(b" ")[2].split(b":")
            seen[int(index)].append(int(number))
        assert all(numbers == list(range(count)) for numbers in seen.values())


def test_a_forked_publisher_that_exits_at_once_still_reaches_everyone(push):
    server = push("fork")
    subscriber = server.connect()
    assert subscriber.command(b"SUB last") == b"+OK"
    for i in range(20):
        publisher = server.connect()
        publisher.sock.sendall(b"PUB last words %d\n" % i)
        publisher.close()  # without waiting for +OK: the child ends right after
    got = sorted(subscriber.msg() for _ in range(20))  # 20 publishers: no order among them
    assert got == sorted(b"MSG last words %d" % i for i in range(20))
    assert subscriber.command(b"PING") == b"+PONG" and not subscriber.msgs


class Loop:
    """What a Relay needs of a serve loop, run by hand: watch and unwatch."""

    def __init__(self):
        self.watched = {}

    def watch(self, fd, callback):
        self.watched[fd] = callback

    def unwatch(self, fd):
        del self.watched[fd]


def test_relay_fans_out_to_the_other_children_and_reads_a_dead_childs_last_words():
    """The relay with real socketpairs and no processes: "children" are the inherited ends."""
    hub = Hub()
    loop = Loop()
    relay = Relay(hub, loop)
    children = {}
    for key in ("a", "b", "c"):
        children[key] = socket.socket(fileno=os.dup(relay._spare[1].fileno()))  # the fork
        children[key].settimeout(10)
        relay.adopt(key)
    assert len(loop.watched) == 3
    try:
        children["a"].sendall(b"MSG x 1\nMSG y 2\nMSG x 3")
        for callback in list(loop.watched.values()):
            callback()
        children["a"].sendall(b"\nSTATS 4 5 6\n")
        children["a"].close()  # "a" exits; its pidfd is seen before its relay socket:
        relay.detach("a")
        assert len(loop.watched) == 2
        hub.publish("z", "from the parent")
        expected = b"MSG x 1\nMSG y 2\nMSG x 3\nMSG z from the parent\n"
        for key in ("b", "c"):
            assert recv_exactly(children[key], len(expected)) == expected
        assert hub.stats()["delivered"] == 4 and hub.stats()["dropped"] == 5
        relay.detach("a")  # idempotent
    finally:
        relay.close()
        for child in children.values():
            child.close()
    assert loop.watched == {} and relay._spare is None


class Sink:
    """A subscriber that takes everything."""

    buffered = 0

    def __init__(self):
        self.got = []

    def write(self, data):
        self.got.append(data)

    gather = write


def test_a_child_can_read_its_uplink_from_its_own_event_loop():
    relay = Relay(Hub(), Loop())
    parent_end = socket.socket(fileno=os.dup(relay._spare[0].fileno()))  # the parent's copy
    parent_end.settimeout(10)
    hub, loop, sink = Hub(), Loop(), Sink()  # the hub of a server built after the fork
    uplink = relay.become_child(hub=hub, loop=loop)
    try:
        hub.subscribe(b"c", sink)
        parent_end.sendall(b"MSG c from the parent\nMSG other x\n")
        loop.watched[uplink.fileno()]()
        assert sink.got == [b"MSG c from the parent\n"]
        hub.publish("c", "from the child")
        line = b"MSG c from the child\n"
        assert recv_exactly(parent_end, len(line)) == line and sink.got[-1] == line
        parent_end.close()  # the parent is gone: the loop stops watching
        loop.watched[uplink.fileno()]()
        assert loop.watched == {}
        hub.publish("c", "still local")
        assert sink.got[-1] == b"MSG c still local\n"
    finally:
        uplink.sock.close()
        parent_end.close()


def test_relay_drops_and_counts_messages_for_a_child_too_far_behind(caplog):
    hub = Hub()
    relay = Relay(hub, Loop())
    relay.max_backlog = 100_000
    child = socket.socket(fileno=os.dup(relay._spare[1].fileno()))
    child.settimeout(10)
    relay.adopt("behind")
    line = b"MSG c " + b"x" * 10_000 + b"\n"
    try:
        for _ in range(200):  # 2 MB for a child that reads nothing meanwhile
            relay.forward(line)
        dropped = hub.stats()["dropped"]
        assert dropped > 0
        assert relay._links["behind"].out.buffered <= relay.max_backlog + len(line)
        assert "child behind is more than 100000 bytes behind" in caplog.text
        assert recv_exactly(child, (200 - dropped) * len(line)) == line * (200 - dropped)
    finally:
        relay.close()
        child.close()


# -- the commands ---------------------------------------------------------------------------


def stdout_lines(proc):
    """A queue that receives the process's stdout lines (None at the end)."""
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_push_command_serves_on_7070_by_default_and_knows_its_settings():
    result = run_cli("push", "--print-config")
    assert result.returncode == 0, result.stderr
    assert 'service = "push"' in result.stdout and "port = 7070  # default" in result.stdout
    assert 'slow_consumer = "disconnect"  # default' in result.stdout
    assert "tick = 0.0  # default" in result.stdout
    bad = run_cli("push", "--slow-consumer", "queue")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("sockserv: error: slow_consumer: 'queue' is not one of "
                                  "disconnect, drop (from --slow-consumer)")


@pytest.mark.parametrize("engine, proto", [("default", "tcp"), ("default", "udp"),
                                           ("fork", "tcp")])
def test_publish_and_subscribe_commands(cli, engine, proto):
    flags = [] if engine == "default" else ["--engine", engine]
    server = cli("push", "--port", "0", "--proto", proto, *flags)
    port = str(server.wait_serving())
    subscriber = cli("subscribe", "news", "sport", "--port", port, "--proto", proto)
    subscriber.wait_line(rf"^sockserv: subscribed to news, sport on {proto} 127\.0\.0\.1:{port}$")
    out = stdout_lines(subscriber.proc)
    for channel, message in (("news", "hello world"), ("sport", "1:0"), ("news", "bye")):
        result = run_cli("publish", channel, message, "--port", port, "--proto", proto)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert out.get(timeout=10) == f"MSG {channel} {message}"
    refused = run_cli("publish", "bad!", "x", "--port", port, "--proto", proto)
    assert refused.returncode == 1
    assert refused.stderr == (f"sockserv: error: {proto} 127.0.0.1:{port} refused it: "
                              "-ERR bad channel\n")
    subscriber.signal(signal.SIGTERM)
    assert subscriber.wait() == 0
    assert out.get(timeout=10) is None  # nothing else was printed


def test_subscribe_exits_0_on_ctrl_c_and_1_when_the_server_goes(cli):
    server = cli("push", "--port", "0")
    port = str(server.wait_serving())
    first = cli("subscribe", "a", "--port", port)
    second = cli("subscribe", "a", "--port", port)
    for subscriber in (first, second):
        subscriber.wait_line("subscribed to a")
    first.signal(signal.SIGINT)
    assert first.wait() == 0
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert second.wait() == 1
    assert second.wait_line(r"^sockserv: error: tcp 127\.0\.0\.1:\d+ closed the connection$")


def test_client_commands_fail_in_one_line():
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = str(unused.getsockname()[1])
        for command in (["publish", "news", "x"], ["subscribe", "news"]):
            result = run_cli(*command, "--port", port)
            assert result.returncode == 1
            assert result.stderr == (f"sockserv: error: cannot connect to tcp "
                                     f"127.0.0.1:{port}: Connection refused\n")
    for args in (["publish", "news", "two\nlines"], ["publish", "news", "x", "--port", "0"],
                 ["subscribe"], ["subscribe", "a b"]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("sockserv: error: ") and result.stderr.count("\n") == 1


def test_forked_children_keep_only_their_own_relay_socket(cli):
    """Each child inherits the relay ends of the children before it; it must close them:
    a late child has no more descriptors than the first."""
    server = cli("push", "--port", "0", "--engine", "fork")
    port = server.wait_serving()
    clients = [Client(port) for _ in range(6)]
    try:
        for client in clients:
            assert client.command(b"SUB a") == b"+OK"
        children = [pid for pid, _ in children_of(server.proc.pid)]
        assert len(children) == 6
        counts = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in children}
        assert len(set(counts.values())) == 1, counts
        assert clients[0].command(b"PUB a relayed") == b"+OK"
        for client in clients:
            assert client.msg() == b"MSG a relayed"
    finally:
        for client in clients:
            client.close()


# -- across pre-forked workers -----------------------------------------------------------


def worker_of_each_client(server_pid, clients):
    """Which worker process holds the server side of each client (from ss -tnp)."""
    import subprocess

    ports = {c.sock.getsockname()[1]: c for c in clients}
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                         text=True, timeout=10).stdout
    owners = {}
    for line in out.splitlines():
        fields = line.split()
        peer_port = int(fields[-2].rsplit(":", 1)[1]) if len(fields) >= 5 else None
        if peer_port in ports and "pid=" in line:
            owners[peer_port] = int(line.split("pid=")[1].split(",")[0])
    return owners


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_pub_in_one_worker_reaches_subscribers_in_every_worker(cli, proto):
    server = cli("push", "--port", "0", "--workers", "3", "--reuse-port", "--proto", proto)
    line = server.wait_line(r"supervisor \d+: 3 \w+ worker\(s\) on ")
    port = int(line.rsplit(":", 1)[1])
    server.wait_line(r"worker\(s\) serving")
    subscribers = []
    for _ in range(12):
        client = Client(port, proto)
        assert client.command(b"SUB news") == b"+OK"
        subscribers.append(client)
    if proto == "tcp":  # the kernel spread them: the relay is what this test is about
        assert len(set(worker_of_each_client(server.proc.pid, subscribers).values())) >= 2
    publishers = [Client(port, proto) for _ in range(3)]
    for i in range(20):
        for n, publisher in enumerate(publishers):
            assert publisher.command(b"PUB news %d:%d" % (n, i)) == b"+OK"
    for client in subscribers:
        got = [client.msg() for _ in range(60)]
        for n in range(3):  # each publisher's messages arrive in its order, once
            mine = [m for m in got if m.startswith(b"MSG news %d:" % n)]
            assert mine == [b"MSG news %d:%d" % (n, i) for i in range(20)]
    for client in subscribers + publishers:
        client.close()


def test_tick_with_workers_comes_once_per_period(cli):
    server = cli("push", "--port", "0", "--workers", "2", "--tick", "0.2")
    line = server.wait_line(r"supervisor \d+: 2 \w+ worker\(s\) on ")
    port = int(line.rsplit(":", 1)[1])
    server.wait_line(r"worker\(s\) serving")
    client = Client(port)
    assert client.command(b"SUB time") == b"+OK"
    import datetime

    stamps = [datetime.datetime.fromisoformat(client.msg().split()[2].decode().rstrip("Z"))
              for _ in range(4)]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    assert min(gaps) > 0.05, gaps  # one process ticks, not one per worker
    client.close()
