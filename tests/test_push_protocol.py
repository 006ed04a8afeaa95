"""The push protocol, the Hub and PushHandler driven with bytes alone (no sockets)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserv import Config, Hub, PushHandler
from sockserv.connection import Connection
from sockserv.engines.base import Stats
from sockserv.push import MAX_DATAGRAM, Action, encode_message, handle_line, valid_channel
from sockserv.relay import _whole_lines, deliver_frames


class FakeServer:
    """What a handler and a hub use of a server: config, stats, hub (and socket_type)."""

    def __init__(self, udp=False, **settings):
        self.config = Config(**settings)
        self.stats = Stats()
        self.socket_type = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        self.hub = Hub(self)


class Recorder(Connection):
    """A connection that records what is written to it; ``pending`` fakes unsent output."""

    def __init__(self, server, handler_class=PushHandler, datagram=False):
        self.datagram = datagram
        self.written: list[bytes] = []
        self.pending = 0
        super().__init__(server, handler_class, ("127.0.0.1", 5555), ("127.0.0.1", 7070))
        self.handler.connection_made()

    @property
    def buffered(self):
        return self.pending

    def write(self, data):
        if not self.closing:
            self.written.append(data)

    def close(self):
        self.closing = True

    def feed(self, data):
        self.handler.data_received(data)
        return self

    @property
    def output(self):
        return b"".join(self.written)


# -- handle_line: every reply and error ----------------------------------------------------


@pytest.mark.parametrize("line, reply, action", [
    (b"SUB news", b"+OK\n", Action("subscribe", b"news")),
    (b"sub news", b"+OK\n", Action("subscribe", b"news")),
    (b"Sub  news ", b"+OK\n", Action("subscribe", b"news")),
    (b"UNSUB news", b"+OK\n", Action("unsubscribe", b"news")),
    (b"unsub a.b_c:d-9", b"+OK\n", Action("unsubscribe", b"a.b_c:d-9")),
    (b"PUB news hello world", b"+OK\n",
     Action("publish", b"news", b"MSG news hello world\n")),
    (b"pub news  two  spaces ", b"+OK\n",
     Action("publish", b"news", b"MSG news  two  spaces \n")),
    (b"PUB news ", b"+OK\n", Action("publish", b"news", b"MSG news \n")),
    (b"PUB news \x00\xff\r", b"+OK\n", Action("publish", b"news", b"MSG news \x00\xff\r\n")),
    (b"PING", b"+PONG\n", Action("ping")),
    (b"ping hello there", b"+PONG hello there\n", Action("ping")),
    (b"PING ", b"+PONG \n", Action("ping")),
    (b"", b"-ERR empty line\n", Action("none")),
    (b"HELLO", b"-ERR unknown command\n", Action("none")),
    (b"SUBSCRIBE news", b"-ERR unknown command\n", Action("none")),
    (b" SUB news", b"-ERR unknown command\n", Action("none")),
    (b"SUB\tnews", b"-ERR unknown command\n", Action("none")),
    (b"\x00\xff\xfe", b"-ERR unknown command\n", Action("none")),
    (b"SUB", b"-ERR usage: SUB <channel>\n", Action("none")),
    (b"SUB ", b"-ERR usage: SUB <channel>\n", Action("none")),
    (b"SUB a b", b"-ERR usage: SUB <channel>\n", Action("none")),
    (b"UNSUB", b"-ERR usage: UNSUB <channel>\n", Action("none")),
    (b"UNSUB a b", b"-ERR usage: UNSUB <channel>\n", Action("none")),
    (b"PUB", b"-ERR usage: PUB <channel> <payload>\n", Action("none")),
    (b"PUB news", b"-ERR usage: PUB <channel> <payload>\n", Action("none")),
    (b"SUB bad!", b"-ERR bad channel\n", Action("none")),
    (b"SUB " + b"c" * 129, b"-ERR bad channel\n", Action("none")),
    (b"UNSUB caf\xc3\xa9", b"-ERR bad channel\n", Action("none")),
    (b"PUB  news x", b"-ERR bad channel\n", Action("none")),
    (b"PUB a/b x", b"-ERR bad channel\n", Action("none")),
])
def test_every_reply_and_error(line, reply, action):
    assert handle_line(line) == (reply, action)


def test_channels_are_1_to_128_bytes_of_the_allowed_characters():
    allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
    for byte in range(256):
        assert valid_channel(bytes([byte])) == (byte in allowed), byte
    assert valid_channel(b"x" * 128)
    assert not valid_channel(b"x" * 129)
    assert not valid_channel(b"")
    assert valid_channel(allowed)
    assert not valid_channel(b"news\n")


def test_over_udp_a_msg_line_must_fit_one_datagram():
    channel = b"c"
    fits = b"PUB c " + b"x" * (MAX_DATAGRAM - len(b"MSG c \n"))
    reply, action = handle_line(fits, MAX_DATAGRAM)
    assert reply == b"+OK\n" and len(action.message) == MAX_DATAGRAM
    assert action.channel == channel
    assert handle_line(fits + b"x", MAX_DATAGRAM) == (
        b"-ERR message too long for one datagram\n", Action("none"))
    assert handle_line(fits + b"x")[0] == b"+OK\n"  # TCP: no such bound


@settings(max_examples=300)
@given(st.binary(max_size=300).filter(lambda line: b"\n" not in line))
def test_any_line_gets_exactly_one_reply_line_and_never_raises(line):
    reply, action = handle_line(line, MAX_DATAGRAM)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert reply[:1] in (b"+", b"-")
    if action.kind == "publish":
        assert action.message == b"MSG " + line[4:] + b"\n"
        assert valid_channel(action.channel)
    elif action.kind in ("subscribe", "unsubscribe"):
        assert valid_channel(action.channel)


@given(st.from_regex(rb"\A[A-Za-z0-9._:-]{1,128}\Z"), st.binary(max_size=100).filter(
    lambda p: b"\n" not in p))
def test_pub_encodes_the_msg_line_subscribers_parse_back(channel, payload):
    reply, action = handle_line(b"PUB " + channel + b" " + payload)
    assert reply == b"+OK\n"
    verb, got_channel, got_payload = action.message[:-1].split(b" ", 2)
    assert (verb, got_channel, got_payload) == (b"MSG", channel, payload)
    assert encode_message(channel, payload) == (channel, action.message)


def test_encode_message_validates_and_takes_str_or_bytes():
    assert encode_message("news", "héllo") == (b"news", "MSG news héllo\n".encode())
    with pytest.raises(ValueError, match="bad channel"):
        encode_message("no spaces", "x")
    with pytest.raises(ValueError, match="newline"):
        encode_message("news", "two\nlines")
    with pytest.raises(ValueError, match="too long for one datagram"):
        encode_message("news", "x" * MAX_DATAGRAM, MAX_DATAGRAM)
    with pytest.raises(TypeError):
        encode_message("news", 42)


# -- the Hub --------------------------------------------------------------------------------


def test_publish_encodes_once_and_hands_the_same_bytes_to_every_subscriber():
    server = FakeServer()
    hub = server.hub
    subscribers = [Recorder(server) for _ in range(5)]
    for conn in subscribers:
        hub.subscribe(b"news", conn)
    forwarded = []
    hub.forward = forwarded.append
    assert hub.publish("news", b"hello") == 5
    line = subscribers[0].written[0]
    assert line == b"MSG news hello\n"
    assert all(conn.written == [line] and conn.written[0] is line for conn in subscribers)
    assert forwarded == [line] and forwarded[0] is line
    assert hub.stats() == {"channels": 1, "subscriptions": 5, "delivered": 5, "dropped": 0,
                           "disconnected": 0}
    assert server.stats.delivered == 5


def test_subscriptions_are_idempotent_and_end_with_the_connection():
    server = FakeServer()
    hub = server.hub
    a, b = Recorder(server), Recorder(server)
    hub.subscribe(b"x", a)
    hub.subscribe(b"x", a)
    hub.subscribe(b"y", a)
    hub.subscribe(b"x", b)
    assert hub.subscribers("x") == 2 and hub.subscriber_count() == 2
    assert hub.publish("x", "1") == 2 and a.written == [b"MSG x 1\n"]
    assert hub.unsubscribe(b"x", a) is True
    assert hub.unsubscribe(b"x", a) is False
    assert hub.publish("x", "2") == 1 and a.written == [b"MSG x 1\n"]
    assert hub.unsubscribe_all(a) is True and hub.unsubscribe_all(a) is False
    assert hub.publish("y", "3") == 0
    assert hub.stats()["channels"] == 1
    b.handler.connection_lost(None)
    assert hub.stats() == {"channels": 0, "subscriptions": 0, "delivered": 3, "dropped": 0,
                           "disconnected": 0}


def test_slow_consumer_drop_skips_only_the_slow_one_and_counts():
    server = FakeServer(max_buffer=1024, slow_consumer="drop")
    hub = server.hub
    fast, slow = Recorder(server), Recorder(server)
    hub.subscribe(b"c", fast)
    hub.subscribe(b"c", slow)
    slow.pending = 1024 - len(b"MSG c 1\n")  # exactly fits
    assert hub.publish("c", "1") == 2
    slow.pending += 1  # one byte too many for the next
    assert hub.publish("c", "2") == 1
    assert fast.written == [b"MSG c 1\n", b"MSG c 2\n"]
    assert slow.written == [b"MSG c 1\n"] and not slow.closing
    assert hub.subscribers("c") == 2
    assert (server.stats.delivered, server.stats.slow_dropped) == (3, 1)
    assert hub.stats()["dropped"] == 1


def test_slow_consumer_disconnect_says_why_if_there_is_room_then_closes():
    server = FakeServer(max_buffer=1024)
    hub = server.hub
    fast, slow, full = Recorder(server), Recorder(server), Recorder(server)
    for conn in (fast, slow, full):
        hub.subscribe(b"c", conn)
        hub.subscribe(b"d", conn)
    slow.pending = 1000  # no room for the message, room for the error line
    full.pending = 1024  # no room for either
    assert hub.publish("c", "x" * 100) == 1
    assert slow.written == [b"-ERR slow consumer\n"] and slow.closing
    assert full.written == [] and full.closing
    assert hub.subscribers("c") == hub.subscribers("d") == 1  # unsubscribed everywhere
    assert hub.publish("c", "y") == 1
    assert server.stats.slow_disconnected == 2 and hub.stats()["disconnected"] == 2


def test_a_message_longer_than_max_buffer_still_reaches_an_idle_subscriber():
    server = FakeServer(max_buffer=1024)
    conn = Recorder(server)
    server.hub.subscribe(b"big", conn)
    assert server.hub.publish("big", "x" * 5000) == 1
    assert len(conn.written[0]) == 5000 + len(b"MSG big \n")


def test_slow_consumer_policy_is_read_at_each_publish():
    server = FakeServer(max_buffer=1024)
    slow = Recorder(server)
    server.hub.subscribe(b"c", slow)
    slow.pending = 5000
    server.config = server.config.replace(slow_consumer="drop")  # what a reload does
    server.hub.publish("c", "1")
    assert not slow.closing and server.stats.slow_dropped == 1


def test_hub_publish_validates_like_the_protocol():
    udp = FakeServer(udp=True)
    assert udp.hub.max_message == MAX_DATAGRAM and FakeServer().hub.max_message is None
    with pytest.raises(ValueError, match="one datagram"):
        udp.hub.publish("c", b"x" * MAX_DATAGRAM)
    with pytest.raises(ValueError, match="bad channel"):
        udp.hub.publish("", b"x")
    assert Hub().publish("c", "nobody listens") == 0  # a hub without a server works too


# -- PushHandler over a recorded connection ------------------------------------------------


def test_handler_session_replies_in_order_and_delivers():
    server = FakeServer()
    sub, pub = Recorder(server), Recorder(server)
    sub.feed(b"SUB news\r\nSUB sport\nPING\n")
    assert sub.output == b"+OK\n+OK\n+PONG\n"
    pub.feed(b"PUB news hi there\nPUB weather sunny\nPUB sport 1:0\nnope\n")
    assert pub.output == b"+OK\n+OK\n+OK\n-ERR unknown command\n"
    assert sub.output.endswith(b"MSG news hi there\nMSG sport 1:0\n")
    sub.feed(b"UNSUB news\n")
    pub.feed(b"PUB news gone\n")
    assert not sub.output.endswith(b"gone\n")
    sub.handler.connection_lost(None)
    assert server.hub.stats()["subscriptions"] == 0


def test_a_publisher_subscribed_to_its_channel_gets_its_message_before_the_ok():
    server = FakeServer()
    conn = Recorder(server).feed(b"SUB me\nPUB me hello\n")
    assert conn.output == b"+OK\nMSG me hello\n+OK\n"


def test_line_too_long_answers_and_closes():
    server = FakeServer(max_line=16)
    conn = Recorder(server).feed(b"PING short\n" + b"PUB c " + b"x" * 20 + b"\nPING never\n")
    assert conn.output == b"+PONG short\n-ERR line too long\n"
    assert conn.closing


def test_udp_publisher_gets_an_error_for_a_message_that_fits_no_datagram():
    server = FakeServer(udp=True)
    sub = Recorder(server, datagram=True).feed(b"SUB c")
    pub = Recorder(server, datagram=True)
    payload = b"x" * (MAX_DATAGRAM - len(b"MSG c \n"))
    pub.feed(b"PUB c " + payload + b"y")
    assert pub.written == [b"-ERR message too long for one datagram\n"]
    pub.feed(b"PUB c " + payload)
    assert pub.written[-1] == b"+OK\n"
    assert sub.written == [b"+OK\n", b"MSG c " + payload + b"\n"]


LINES = st.one_of(
    st.sampled_from([b"SUB a", b"SUB b", b"sub a", b"UNSUB a", b"PUB a x y", b"PUB b  z",
                     b"PUB a", b"PING", b"PING p", b"", b"SUB bad!", b"what"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
)
STREAMS = st.lists(st.tuples(LINES, st.sampled_from([b"\n", b"\r\n"])), max_size=25).map(
    lambda pairs: b"".join(line + end for line, end in pairs))


def _run_session(chunks, max_line=32):
    server = FakeServer(max_line=max_line)
    observer = Recorder(server).feed(b"SUB a\nSUB b\n")
    conn = Recorder(server)
    for chunk in chunks:
        conn.feed(chunk)
    if not conn.closing:
        conn.handler.eof_received()
    conn.handler.connection_lost(None)
    return conn.output, observer.output, server.hub.stats()


@settings(max_examples=200)
@given(STREAMS, st.binary(max_size=60), st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_of_a_stream_gives_the_same_replies(stream, tail, cuts):
    stream += tail  # maybe an unterminated (or too long) last line
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert _run_session(chunks) == _run_session([stream])


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_any_bytes_get_replies_or_a_clean_close_never_an_exception(data):
    server = FakeServer(max_line=64)
    conn = Recorder(server)
    conn.feed(data)
    if not conn.closing:
        conn.handler.eof_received()  # the default closes
    assert conn.closing
    replies = conn.output.split(b"\n")
    assert replies.pop() == b""
    assert all(reply[:1] in (b"+", b"-") for reply in replies)
    lines = data.split(b"\n")
    if replies and replies[-1] == b"-ERR line too long":
        assert any(len(line.rstrip(b"\r")) > 64 for line in lines)
    else:
        # every terminated line, and an unterminated last one (less a final "\r") at EOF
        assert len(replies) == len(lines) - 1 + (1 if lines[-1].removesuffix(b"\r") else 0)


# -- relay frames -----------------------------------------------------------------------------


def test_relay_frames_reach_local_subscribers_and_stats_reports_the_counters():
    server = FakeServer()
    conn = Recorder(server)
    server.hub.subscribe(b"a", conn)
    deliver_frames(server.hub, b"MSG a 1\nMSG b 2\nMSG a x y\nSTATS 5 1 2\nMSG  broken\n"
                               b"junk\nSTATS x\n")
    assert conn.written == [b"MSG a 1\n", b"MSG a x y\n"]
    assert server.stats.delivered == 2 + 5
    assert (server.stats.slow_dropped, server.stats.slow_disconnected) == (1, 2)


def test_relay_reassembles_lines_across_reads():
    assert _whole_lines(b"", b"MSG a 1\nMSG a") == (b"MSG a 1\n", b"MSG a")
    assert _whole_lines(b"MSG a", b" 2\n") == (b"MSG a 2\n", b"")
    assert _whole_lines(b"", b"partial") == (b"", b"partial")
