"""LineFramer, driven with bytes alone."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockserv import LineFramer


def test_complete_lines_come_out_without_terminators():
    framer = LineFramer()
    assert framer.feed(b"one\ntwo\r\nthree") == [b"one", b"two"]
    assert framer.pending == 5
    assert framer.feed(b"\n") == [b"three"]


def test_a_line_split_across_feeds_is_joined():
    framer = LineFramer()
    assert framer.feed(b"he") == []
    assert framer.feed(b"l") == []
    assert framer.feed(b"lo\nwor") == [b"hello"]
    assert framer.feed(b"ld\n") == [b"world"]


def test_crlf_split_between_feeds_is_one_terminator():
    framer = LineFramer()
    assert framer.feed(b"abc\r") == []
    assert framer.feed(b"\n") == [b"abc"]


def test_empty_lines_are_lines():
    assert LineFramer().feed(b"\n\r\n\n") == [b"", b"", b""]


def test_line_of_exactly_max_line_is_accepted():
    framer = LineFramer(max_line=4)
    assert framer.feed(b"abcd\r\n") == [b"abcd"]
    assert not framer.too_long


def test_too_long_line_stops_framing_but_keeps_earlier_lines():
    framer = LineFramer(max_line=4)
    assert framer.feed(b"ok\nabcde\nlater\n") == [b"ok"]
    assert framer.too_long
    assert framer.feed(b"more\n") == []


def test_too_long_partial_line_is_caught_before_its_newline():
    framer = LineFramer(max_line=4)
    assert framer.feed(b"abc") == []
    assert not framer.too_long
    framer.feed(b"defg")
    assert framer.too_long
    assert framer.pending == 0  # the buffer is not kept growing


def test_flush_returns_the_unterminated_tail_once():
    framer = LineFramer()
    framer.feed(b"a\ntail\r")
    assert framer.flush() == b"tail"
    assert framer.flush() == b""


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=12))
def test_any_split_of_a_stream_gives_the_same_lines(data, cuts):
    whole = LineFramer(max_line=1 << 20)
    expected = whole.feed(data)
    split = LineFramer(max_line=1 << 20)
    got, last = [], 0
    for cut in sorted(cuts) + [len(data)]:
        got += split.feed(data[last:cut])
        last = max(last, cut)
    assert got == expected
    assert split.flush() == whole.flush()


@given(st.binary(max_size=300), st.integers(1, 40))
def test_no_line_longer_than_max_line_ever_comes_out(data, max_line):
    framer = LineFramer(max_line=max_line)
    for i in range(0, len(data), 7):
        for line in framer.feed(data[i:i + 7]):
            assert len(line) <= max_line


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_byte_at_a_time_slowloris_is_bounded(chunk):
    framer = LineFramer(max_line=100)
    data = b"x" * 1000
    for i in range(0, len(data), chunk):
        framer.feed(data[i:i + chunk])
        assert framer.pending <= 101
    assert framer.too_long
