"""Handler, LineHandler and EchoHandler driven with bytes alone (no sockets)."""

from types import SimpleNamespace

from sockserv import Config, EchoHandler, LineHandler
from sockserv.connection import Connection


class Recorder(Connection):
    """A connection that records what the handler does, so tests can drive it with bytes."""

    def __init__(self, handler_class, datagram=False, **settings):
        server = SimpleNamespace(config=Config(**settings), stats=None)
        self.datagram = datagram
        self.written: list[bytes] = []
        super().__init__(server, handler_class, ("127.0.0.1", 5555), ("127.0.0.1", 7007))

    def write(self, data):
        if not self.closing:
            self.written.append(bytes(data))

    def close(self):
        self.closing = True

    @property
    def output(self):
        return b"".join(self.written)


class Upper(LineHandler):
    def line_received(self, line):
        self.conn.write(line.upper() + b"\n")


def test_echo_returns_every_chunk_as_it_came():
    conn = Recorder(EchoHandler)
    conn.handler.connection_made()
    for chunk in (b"a", b"\x00\xff", b"hello\r\n"):
        conn.handler.data_received(chunk)
    assert conn.written == [b"a", b"\x00\xff", b"hello\r\n"]
    assert not conn.closing


def test_echo_closes_after_end_of_input():
    conn = Recorder(EchoHandler)
    conn.handler.data_received(b"x")
    conn.handler.eof_received()
    assert conn.closing
    assert conn.output == b"x"


def test_line_handler_gets_whole_lines():
    conn = Recorder(Upper)
    conn.handler.data_received(b"ab")
    conn.handler.data_received(b"c\r\nde")
    assert conn.output == b"ABC\n"
    conn.handler.data_received(b"f\n")
    assert conn.output == b"ABC\nDEF\n"


def test_line_handler_delivers_an_unterminated_last_line_at_eof():
    conn = Recorder(Upper)
    conn.handler.data_received(b"one\ntwo")
    conn.handler.eof_received()
    assert conn.output == b"ONE\nTWO\n"
    assert conn.closing


def test_line_too_long_answers_err_and_closes():
    conn = Recorder(Upper, max_line=8)
    conn.handler.data_received(b"short\n" + b"y" * 20 + b"\nnever\n")
    assert conn.output == b"SHORT\n-ERR line too long\n"
    assert conn.closing


def test_class_max_line_overrides_the_setting():
    class Tiny(Upper):
        max_line = 2

    conn = Recorder(Tiny, max_line=100)
    conn.handler.data_received(b"abc\n")
    assert conn.output == b"-ERR line too long\n"


def test_over_udp_each_datagram_is_framed_on_its_own():
    conn = Recorder(Upper, datagram=True)
    conn.handler.data_received(b"one\ntwo")
    conn.handler.data_received(b"three\r\n")
    assert conn.output == b"ONE\nTWO\nTHREE\n"


def test_lines_after_close_are_not_handled():
    class CloseOnQuit(LineHandler):
        def line_received(self, line):
            if line == b"quit":
                self.conn.close()
            else:
                self.conn.write(line + b"\n")

    conn = Recorder(CloseOnQuit)
    conn.handler.data_received(b"a\nquit\nb\n")
    assert conn.output == b"a\n"


def test_dispatch_turns_a_handler_exception_into_an_abort(caplog):
    class Broken(EchoHandler):
        def data_received(self, data):
            raise ValueError("boom")

    conn = Recorder(Broken)
    assert conn.dispatch("data_received", b"x") is False
    assert conn.closing
    assert "boom" in caplog.text
