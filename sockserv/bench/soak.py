"""The soak workload (push protocol): accounted subscribers, publishers and pingers, the
misbehaving fault connections, and :func:`soak_accounting`, which counts what was lost.
"""

from __future__ import annotations

import array
import bisect
import errno
import heapq
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

from .common import READ, SOAK_STAMP, WRITE, now_ns
from .histogram import Histogram
from .options import Options
from .payloads import Payloads, fills
from .worker import Worker

__all__ = [
    "SoakConn", "Accounted", "Pinger", "SoakSub", "SoakPub", "Fault", "ResetMidWrite",
    "ResetMidRead", "HalfClose", "Garbage", "LongLine", "BurstPing", "Dribble", "SlowReader",
    "SlowFeeder", "SubChurn", "FAULTS", "BURST", "SLOW_BYTES", "SOAK_COUNTS", "SoakWorker",
    "soak_accounting",
]


class SoakConn:
    """One TCP connection of the soak workload: a non-blocking connect (or a socket connected
    during setup), writes queued while the kernel does not take them, and what arrives handed
    to :meth:`received`. Subclasses say what the bytes mean."""

    def __init__(self, worker: SoakWorker) -> None:
        self.w = worker
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.buf = b""
        self.connected = False
        self.alive = False
        self.dropped = False
        self.reading = True
        self.shut_after = False
        self.events = 0

    def open(self, conn_id: int, rcvbuf: int = 0) -> None:
        """Start a non-blocking connect (``rcvbuf``: a small receive buffer, set first)."""
        try:
            sock = self.w.tcp_socket(conn_id)
        except OSError as exc:
            self.refused(exc)
            return
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        rc = sock.connect_ex(self.w.o.addr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self.refused(rc)
            return
        self.sock = sock
        self.alive = True
        self.update()

    def adopt(self, sock: socket.socket) -> None:
        """Take a socket that is already connected."""
        self.sock = sock
        self.alive = self.connected = True
        self.update()
        self.opened(now_ns())

    def update(self) -> None:
        """Register the events this connection waits for (none while a reader is paused)."""
        if not self.alive:
            return
        events = ((WRITE if self.out or not self.connected else 0)
                  | (READ if self.reading and self.connected else 0))
        if events != self.events:
            sel = self.w.sel
            if not self.events:
                sel.register(self.sock, events, self.on_event)
            elif not events:
                sel.unregister(self.sock)
            else:
                sel.modify(self.sock, events, self.on_event)
            self.events = events

    def on_event(self, mask: int) -> None:
        """Connected, writable or readable."""
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close()
                self.refused(err)
                return
            self.connected = True
            self.update()
            self.opened(now_ns())
            return
        if mask & WRITE and self.out:
            self.flush()
        if mask & READ and self.alive and self.reading:
            try:
                data = self.sock.recv(262144)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close()
                self.lost(exc)
                return
            if data:
                self.received(data, now_ns())
            else:
                self.ended(now_ns())

    def send(self, data: bytes) -> None:
        """Send ``data`` after whatever is queued."""
        if self.alive:
            self.out += data
            if self.connected:
                self.flush()
            else:
                self.update()

    def flush(self) -> None:
        """Send what is queued, as much as the kernel takes."""
        try:
            done = self.sock.send(self.out)
        except BlockingIOError:
            done = 0
        except OSError as exc:
            self.close()
            self.lost(exc)
            return
        del self.out[:done]
        self.update()
        if not self.out and self.shut_after:
            self.half_close()

    def half_close(self) -> None:
        """Shut the write side once everything queued is sent."""
        self.shut_after = True
        if self.out or not self.alive:
            return
        self.shut_after = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.close()
            self.lost(exc)

    def close(self, reset: bool = False) -> None:
        """Close (``reset``: with SO_LINGER 0, so the server gets a reset)."""
        if not self.alive:
            return
        self.alive = False
        if self.events:
            self.w.sel.unregister(self.sock)
            self.events = 0
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def lines(self, data: bytes) -> list[bytes]:
        """The complete lines in what arrived (terminators stripped)."""
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        return lines

    # what subclasses handle

    def opened(self, now: int) -> None:
        """The connection is up."""

    def received(self, data: bytes, now: int) -> None:
        """Bytes arrived."""

    def ended(self, now: int) -> None:
        """The server closed the connection (end of file)."""
        self.close()
        self.lost("connection closed by the server")

    def lost(self, what: Any) -> None:
        """The connection failed (already closed)."""

    def refused(self, what: Any) -> None:
        """The connect failed."""
        self.w.note_error("connect_errors", what)


class Accounted(SoakConn):
    """An accounted connection: counted once connected; its failure is an error."""

    def opened(self, now: int) -> None:
        self.w.c["connected"] += 1

    def lost(self, what: Any) -> None:
        self.w.drop(self, "resets", what)


class Pinger(Accounted):
    """An accounted request/response client: ``PING <text>`` -> ``+PONG <text>``, one in
    flight, random text of 1 to ``--size`` bytes, every byte checked."""

    def __init__(self, worker: SoakWorker) -> None:
        super().__init__(worker)
        self.expect = b""
        self.got = 0
        self.t = 0

    def ping(self, now: int) -> None:
        """Send the next PING."""
        w = self.w
        text = w.text(w.rng.randint(1, w.size))
        self.expect = b"+PONG " + text + b"\n"
        self.got = 0
        self.t = now
        w.c["pings"] += 1
        self.send(b"PING " + text + b"\n")

    def received(self, data: bytes, now: int) -> None:
        w = self.w
        if not self.expect.startswith(data, self.got):
            w.drop(self, "mismatches", "the +PONG text differs from the PING text")
            return
        self.got += len(data)
        if self.got < len(self.expect):
            return
        self.expect = b""
        c = w.c
        c["round_trips"] += 1
        if w.ws <= now < w.we:
            w.hist.record(now - self.t)
            c["window"] += 1
        if w.sending:
            self.ping(now)


class SoakSub(Accounted):
    """An accounted subscriber of one or two channels. Per publisher it tracks the first
    sequence number seen, the next one due and the gaps, so that the parent can tell which
    messages published after this subscriber's ``+OK`` never came (see
    :func:`soak_accounting`); duplicates and messages out of order are counted here."""

    def __init__(self, worker: SoakWorker, sub_id: int, late: bool = False) -> None:
        super().__init__(worker)
        self.channels = worker.channels_of(sub_id)
        self.chset = set(self.channels)
        self.want = {p for ch in self.channels for p in worker.pubs_on[ch]}
        self.late = late
        self.oks: list[int] = []
        self.seqs: dict[int, list[Any]] = {}  # publisher -> [first, next, missing set or None]
        self.ends: set[int] = set()
        self.t_open = 0

    def opened(self, now: int) -> None:
        super().opened(now)
        w = self.w
        self.t_open = now
        self.send(b"".join(b"SUB " + w.names[ch] + b"\n" for ch in self.channels))

    @property
    def subscribed(self) -> bool:
        """Every SUB has its +OK."""
        return len(self.oks) == len(self.channels)

    def finished(self) -> bool:
        """Nothing more is due: every publisher's end marker came, or the connection failed."""
        return not self.alive or (self.subscribed and self.ends >= self.want)

    def received(self, data: bytes, now: int) -> None:
        w = self.w
        for line in self.lines(data):
            if line.startswith(b"MSG "):
                self.message(line, now)
            elif line.rstrip(b"\r") == b"+OK" and not self.subscribed:
                self.oks.append(now)
                if self.subscribed:
                    w.c["subscribers"] += 1
                    if self.late:
                        w.c["late_subscribers"] += 1
            else:
                w.note_error("protocol", f"subscriber got {line[:80]!r}")

    def message(self, line: bytes, now: int) -> None:
        """One MSG line: check it, then its place in its publisher's sequence."""
        w = self.w
        parsed = w.parse_msg(line)
        if isinstance(parsed, str):
            w.note_error("mismatches", parsed)
            return
        ch, pub, stamp, seq = parsed
        c = w.c
        if ch not in self.chset:  # (before its +OK is fine: MSG lines come at any time)
            w.note_error("mismatches", f"a MSG on channel {w.names[ch].decode()}, not subscribed")
            return
        if seq < 0:
            if pub in self.ends:
                c["duplicates"] += 1
            self.ends.add(pub)
            return
        st = self.seqs.get(pub)
        if st is None:
            self.seqs[pub] = [seq, seq + 1, None]
        else:
            first, nxt, missing = st
            if seq == nxt:
                st[1] = nxt + 1
            elif seq > nxt:
                if seq - nxt > 10_000_000:
                    w.note_error("mismatches",
                                 f"publisher {pub}: sequence jumped from {nxt} to {seq}")
                    return
                st[2] = missing = missing or set()
                missing.update(range(nxt, seq))
                st[1] = seq + 1
            elif missing and seq in missing:
                missing.discard(seq)
                c["reordered"] += 1
            elif seq < first:
                st[2] = missing = missing or set()
                missing.update(range(seq + 1, first))
                st[0] = seq
                c["reordered"] += 1
            else:
                c["duplicates"] += 1
                return
        c["received"] += 1
        if w.ws <= now < w.we:
            w.dhist.record(now - stamp)
            c["dwindow"] += 1

    def records(self) -> list[tuple[Any, ...]]:
        """Per (channel, publisher): (publisher, time of the +OK, first, next, gaps, end seen)."""
        out = []
        for i, ch in enumerate(self.channels):
            if i >= len(self.oks):
                continue
            for pub in self.w.pubs_on[ch]:
                first, nxt, missing = self.seqs.get(pub, (-1, -1, None))
                out.append((pub, self.oks[i], first, nxt, sorted(missing or ()),
                            pub in self.ends))
        return out


class SoakPub(Accounted):
    """An accounted publisher: ``PUB`` at a steady rate on its channel, each payload stamped
    with its publisher number, the sending time (CLOCK_MONOTONIC ns) and a sequence number;
    it keeps every stamp, so the parent can tell which messages came after a subscriber's +OK."""

    def __init__(self, worker: SoakWorker, pub: int) -> None:
        super().__init__(worker)
        o = worker.o
        self.pub = pub
        self.head = b"PUB " + worker.names[pub % o.channels] + b" "
        self.interval = max(1, int(1e9 * o.publishers / o.rate))
        self.stamps = array.array("q")
        self.seq = self.acks = self.expect = 0
        self.next_t = 0
        self.end_stamp = 0

    def publish_due(self, now: int) -> None:
        """Publish every message whose time has come (catching up if late); a timer calls it."""
        w = self.w
        if not w.sending:
            return
        fill = w.fills
        c = w.c
        while self.next_t <= now and self.alive:
            stamp = now_ns()
            seq = self.seq
            self.stamps.append(stamp)
            self.seq = seq + 1
            self.expect += 1
            self.next_t += self.interval
            c["published"] += 1
            self.send(self.head + b"%04x%016x%08x" % (self.pub, stamp, seq) + fill[seq % 26]
                      + b"\n")
        if self.alive:
            w.call_at(self.next_t, self.publish_due)

    def end(self) -> None:
        """The window is over: publish the end marker."""
        if self.alive:
            self.end_stamp = now_ns()
            self.expect += 1
            self.send(self.head + b"END.%04x\n" % self.pub)

    def received(self, data: bytes, now: int) -> None:
        for line in self.lines(data):
            if line.rstrip(b"\r") == b"+OK" and self.acks < self.expect:
                self.acks += 1
                if self.acks <= self.seq:
                    self.w.c["accepted"] += 1
            else:
                self.w.note_error("protocol", f"publisher got {line[:80]!r}")

    def record(self) -> tuple[int, bytes, bool, int]:
        """(accepted messages, their stamps, end marker accepted, its stamp)."""
        accepted = min(self.acks, self.seq)
        return (accepted, self.stamps[:accepted].tobytes(),
                bool(self.end_stamp) and self.acks > self.seq, self.end_stamp)


class Fault(SoakConn):
    """A connection that misbehaves on purpose, apart from the accounted ones. It ends with
    an outcome: ``ok`` (the server did what it promises), ``shed`` (the server closed or
    trimmed it, as it may) or ``failed`` (counted as an error)."""

    kind = ""
    rcvbuf = 0
    wait_close = False  # once answered, wait for the server's close

    def __init__(self, worker: SoakWorker, now: int) -> None:
        super().__init__(worker)
        self.deadline = now + worker.timeout_ns
        self.token = b"%016x" % worker.rng.getrandbits(64)
        self.expect = b""
        self.got = 0

    def start(self) -> None:
        """Connect."""
        self.open(self.w.next_serial(), self.rcvbuf)

    def finish(self, outcome: str, counter: str | None = None, what: Any = None,
               reset: bool = False) -> None:
        """Count the outcome (and an error, if ``counter``) and close."""
        w = self.w
        if self not in w.faults:
            return
        w.faults.discard(self)
        self.close(reset)
        w.c[f"fault.{self.kind}.{outcome}"] += 1
        if counter:
            w.note_error(counter, f"{self.kind}: {what}" if counter == "faults" else what)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` continues the expected reply (if not, the fault failed)."""
        if not self.expect.startswith(data, self.got):
            self.finish("failed", "mismatches",
                        f"{self.kind}: the reply differs from {self.expect[:40]!r}...")
            return False
        self.got += len(data)
        return True

    @property
    def answered(self) -> bool:
        """The whole expected reply came."""
        return self.got == len(self.expect)

    def ping(self, send: bool = True) -> bytes:
        """Expect the +PONG of a PING of this fault's token; send it (and return it)."""
        self.expect = b"+PONG " + self.token + b"\n"
        line = b"PING " + self.token + b"\n"
        if send:
            self.send(line)
        return line

    def received(self, data: bytes, now: int) -> None:
        if self.matches(data) and self.answered and not self.wait_close:
            self.reply_done(now)

    def reply_done(self, now: int) -> None:
        """The whole expected reply came."""
        self.finish("ok")

    def refused(self, what: Any) -> None:
        self.finish("failed", "connect_errors", what)

    def lost(self, what: Any) -> None:
        self.finish("failed", "faults", what)

    def ended(self, now: int) -> None:
        self.finish("failed", "faults", "closed by the server")


class ResetMidWrite(Fault):
    """After one PING round trip, half a PUB line to an accounted channel, then a reset: the
    server must drop the unfinished line (a subscriber would catch it as a garbled MSG)."""

    kind = "reset_write"

    def opened(self, now: int) -> None:
        self.ping()

    def reply_done(self, now: int) -> None:
        self.send(b"PUB " + self.w.names[0] + b" half-written " + self.w.text(8192))
        self.finish("ok", reset=True)


class ResetMidRead(Fault):
    """With a small receive buffer, 16 PINGs of 8 KB; after the first 16 KB of replies (all
    checked), a reset while the server still has replies to write."""

    kind = "reset_read"
    rcvbuf = 8192

    def opened(self, now: int) -> None:
        text = self.w.text(8192)
        self.expect = (b"+PONG " + text + b"\n") * 16
        self.send((b"PING " + text + b"\n") * 16)

    def received(self, data: bytes, now: int) -> None:
        if self.matches(data) and self.got >= 16384:
            self.finish("ok", reset=True)


class HalfClose(Fault):
    """Two PINGs, then shut the write side: both answers must come, then the server's close."""

    kind = "half_close"
    wait_close = True

    def opened(self, now: int) -> None:
        t = self.token
        self.expect = b"+PONG a" + t + b"\n+PONG b" + t + b"\n"
        self.send(b"PING a" + t + b"\nPING b" + t + b"\n")
        self.half_close()

    def ended(self, now: int) -> None:
        if self.answered:
            self.finish("ok")
        else:
            self.finish("failed", "faults", f"closed after {self.got} of {len(self.expect)} "
                                            "bytes of the answers")


class Garbage(Fault):
    """Random binary bytes (up to 2 KB, any line that would be a PUB defused), then a PING:
    one reply line per line sent (``+OK``, ``+PONG`` or ``-ERR``), the PING's last."""

    kind = "garbage"

    def opened(self, now: int) -> None:
        w = self.w
        data = w.rng.randbytes(w.rng.randint(1, max(1, min(2048, w.o.max_line // 2))))
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if line.partition(b" ")[0].upper() == b"PUB":
                lines[i] = b"\0" + line
        data = b"\n".join(lines) + b"\nPING " + self.token + b"\n"
        self.want = data.count(b"\n")
        self.replies = 0
        self.send(data)

    def received(self, data: bytes, now: int) -> None:
        for line in self.lines(data):
            if line.startswith(b"MSG "):
                continue
            if not line.startswith((b"+OK", b"+PONG", b"-ERR")):
                self.finish("failed", "faults", f"reply {line[:60]!r}")
                return
            self.replies += 1
            if line == b"+PONG " + self.token:
                if self.replies == self.want:
                    self.finish("ok")
                else:
                    self.finish("failed", "faults",
                                f"{self.replies} replies to {self.want} lines")
                return


class LongLine(Fault):
    """A line longer than ``--max-line``: ``-ERR line too long``, then the server's close."""

    kind = "long_line"
    wait_close = True

    def opened(self, now: int) -> None:
        self.expect = b"-ERR line too long\n"
        self.send(b"x" * (self.w.o.max_line + 2))

    def ended(self, now: int) -> None:
        self.lost("closed without -ERR line too long")

    def lost(self, what: Any) -> None:
        if self.answered:  # a reset after the reply is a close too
            self.finish("ok")
        else:
            self.finish("failed", "faults", what)


class BurstPing(Fault):
    """One of ``BURST`` connections opened at once: a PING, its answer, a close."""

    kind = "burst"

    def opened(self, now: int) -> None:
        self.ping()


class Dribble(Fault):
    """A PING sent two bytes every 100 ms (slowloris): it must be answered, unless the server
    closes a client this slow (idle_timeout), which counts as shed."""

    kind = "dribble"

    def opened(self, now: int) -> None:
        self.rest = self.ping(send=False)
        self.step(now)

    def step(self, now: int) -> None:
        """Send the next two bytes."""
        if self.alive:
            self.send(self.rest[:2])
            self.rest = self.rest[2:]
            if self.rest:
                self.w.call_at(now + 100_000_000, self.step)

    def ended(self, now: int) -> None:
        self.finish("shed")

    def lost(self, what: Any) -> None:
        self.finish("shed")


class SlowReader(Fault):
    """A subscriber that stops reading (small receive buffer) while a feeder connection
    publishes ``SLOW_BYTES`` to its private channel; every PUB must still be answered (a slow
    reader stalls no one). Then it reads again and sends a PING: the server shed it (closed
    it, or dropped messages for it) or kept them all."""

    kind = "slow_reader"
    rcvbuf = 4096

    def __init__(self, worker: SoakWorker, now: int) -> None:
        super().__init__(worker, now)
        w = worker
        self.chan = b"%s.slow.%d.%d" % (w.o.channel.encode(), w.index, w.next_serial())
        size = max(1, min(32768, w.o.max_line - len(self.chan) - 8))
        payload = w.text(size)
        self.pub_line = b"PUB " + self.chan + b" " + payload + b"\n"
        self.msg_line = b"MSG " + self.chan + b" " + payload
        self.n = max(1, min(2000, SLOW_BYTES // size))
        self.msgs = 0
        self.draining = False
        self.feeder: SlowFeeder | None = None

    def opened(self, now: int) -> None:
        self.send(b"SUB " + self.chan + b"\n")

    def received(self, data: bytes, now: int) -> None:
        for line in self.lines(data):
            if not self.draining and self.feeder is None and line == b"+OK":
                self.reading = False  # stop reading; the feeder starts publishing
                self.update()
                self.feeder = SlowFeeder(self)
                self.feeder.open(self.w.next_serial())
            elif self.draining and line == self.msg_line:
                self.msgs += 1
            elif self.draining and line == b"-ERR slow consumer":
                pass
            elif self.draining and line == b"+PONG " + self.token:
                self.finish("ok" if self.msgs == self.n else "shed")
                return
            else:
                self.finish("failed", "faults", f"got {line[:60]!r}")
                return

    def fed(self, now: int) -> None:
        """Every PUB was answered: read again, then PING to learn what the server kept."""
        self.draining = True
        self.reading = True
        self.update()
        self.send(b"PING " + self.token + b"\n")

    def ended(self, now: int) -> None:
        self.lost("closed by the server")

    def lost(self, what: Any) -> None:
        if self.draining:
            self.finish("shed")  # the server disconnected the slow consumer
        else:
            self.finish("failed", "faults", what)

    def finish(self, outcome: str, counter: str | None = None, what: Any = None,
               reset: bool = False) -> None:
        if self.feeder is not None:
            self.feeder.close()
        super().finish(outcome, counter, what, reset)


class SlowFeeder(SoakConn):
    """A slow reader's publisher: one PUB at a time, each answered before the next."""

    def __init__(self, reader: SlowReader) -> None:
        super().__init__(reader.w)
        self.reader = reader
        self.acks = 0

    def opened(self, now: int) -> None:
        self.send(self.reader.pub_line)

    def received(self, data: bytes, now: int) -> None:
        reader = self.reader
        for line in self.lines(data):
            if line != b"+OK":
                reader.finish("failed", "faults", f"the feeder got {line[:60]!r}")
                return
            self.acks += 1
            if self.acks == reader.n:
                self.close()
                reader.fed(now)
                return
            self.send(reader.pub_line)

    def ended(self, now: int) -> None:
        self.lost("closed by the server")

    def lost(self, what: Any) -> None:
        self.reader.finish("failed", "faults", f"feeder: {what}")

    def refused(self, what: Any) -> None:
        self.reader.finish("failed", "connect_errors", what)


class SubChurn(Fault):
    """SUB an accounted channel, take its messages (checked) for 0.3 s, UNSUB, SUB again and
    reset while subscribed."""

    kind = "sub_churn"

    def __init__(self, worker: SoakWorker, now: int) -> None:
        super().__init__(worker, now)
        self.ch = worker.rng.randrange(worker.o.channels)
        self.oks = 0

    def opened(self, now: int) -> None:
        self.send(b"SUB " + self.w.names[self.ch] + b"\n")

    def received(self, data: bytes, now: int) -> None:
        w = self.w
        for line in self.lines(data):
            if line.startswith(b"MSG "):
                parsed = w.parse_msg(line)
                if isinstance(parsed, str) or parsed[0] != self.ch:
                    self.finish("failed", "mismatches", parsed if isinstance(parsed, str) else
                                f"a MSG for channel {parsed[0]}, not {self.ch}")
                    return
            elif line == b"+OK":
                self.oks += 1
                if self.oks == 1:
                    w.call_at(now + 300_000_000, self.unsubscribe)
                elif self.oks == 2:
                    self.send(b"SUB " + w.names[self.ch] + b"\n")
                else:
                    self.finish("ok", reset=True)
                    return
            else:
                self.finish("failed", "faults", f"got {line[:60]!r}")
                return

    def unsubscribe(self, now: int) -> None:
        """Time to UNSUB."""
        self.send(b"UNSUB " + self.w.names[self.ch] + b"\n")


FAULTS: dict[str, type[Fault]] = {
    cls.kind: cls for cls in (ResetMidWrite, ResetMidRead, HalfClose, Garbage, LongLine,
                              BurstPing, SlowReader, Dribble, SubChurn)
}
BURST = 10  # connections a burst opens at once
SLOW_BYTES = 8 << 20  # what a slow reader's feeder publishes: more than the kernel buffers
SOAK_COUNTS = ("connected", "subscribers", "late_subscribers", "published", "accepted",
               "received", "dwindow", "duplicates", "reordered", "pings", "round_trips",
               "faults")


class SoakWorker(Worker):
    """soak: this process's share of subscribers, publishers, pingers and faults."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        o = opts
        self.size = o.size
        self.names = [f"{o.channel}.{i}".encode() for i in range(o.channels)]
        self.channel_index = {name: i for i, name in enumerate(self.names)}
        self.pubs_on = [[p for p in range(o.publishers) if p % o.channels == ch]
                        for ch in range(o.channels)]
        self.fills = fills(o.size - SOAK_STAMP)
        self.payloads = Payloads(o.size, 16384)
        self.rng = random.Random(7070 + index)
        self.timers: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self.serial = 0
        self.subs: list[SoakSub] = []
        self.pubs: list[SoakPub] = []
        self.pingers: list[Pinger] = []
        self.faults: set[Fault] = set()
        self.dhist = Histogram()
        self.next_check = 0
        self.done = False
        for name in SOAK_COUNTS:
            self.c[name] = 0
        for kind in FAULTS:
            for outcome in ("run", "ok", "shed", "failed"):
                self.c[f"fault.{kind}.{outcome}"] = 0

    # -- helpers for the connections

    def channels_of(self, sub_id: int) -> list[int]:
        """A subscriber's channels: one, and for odd ones the next channel too."""
        n = self.o.channels
        ch = sub_id % n
        return [ch, (ch + 1) % n] if n > 1 and sub_id % 2 else [ch]

    def text(self, n: int) -> bytes:
        """``n`` random letters and digits (n <= 65536)."""
        p = self.payloads
        off = self.rng.randrange(p.ring_len)
        return p.ring2[off:off + n]

    def next_serial(self) -> int:
        """A number for a fault connection (its source address, its channel name)."""
        self.serial += 1
        return self.serial

    def call_at(self, t: int, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(now, *args)`` at ``t`` (ns) from the loop."""
        self.serial += 1
        heapq.heappush(self.timers, (t, self.serial, fn, args))
        self.next_tick = min(self.next_tick, t)

    def parse_msg(self, line: bytes) -> tuple[int, int, int, int] | str:
        """A ``MSG`` line -> (channel, publisher, stamp, sequence; -1 for an end marker), or
        what is wrong with it."""
        i = line.find(b" ", 4)
        ch = self.channel_index.get(line[4:i]) if i > 0 else None
        if ch is None:
            return f"a MSG on a channel no one subscribed to: {line[:60]!r}"
        payload = line[i + 1:]
        stamp = seq = -1
        try:
            if payload.startswith(b"END."):
                pub = int(payload[4:], 16)
                good = payload == b"END.%04x" % pub
            else:
                pub = int(payload[:4], 16)
                stamp = int(payload[4:20], 16)
                seq = int(payload[20:SOAK_STAMP], 16)
                good = (len(payload) == self.size and payload[SOAK_STAMP:] == self.fills[seq % 26]
                        and payload[:SOAK_STAMP] == b"%04x%016x%08x" % (pub, stamp, seq))
        except ValueError:
            good = False
        if not good:
            return f"garbled message: {line[:60]!r}"
        if pub >= self.o.publishers or pub % self.o.channels != ch:
            return f"publisher {pub}'s message on channel {self.names[ch].decode()}"
        return ch, pub, stamp, seq

    def drop(self, conn: SoakConn, counter: str, what: Any) -> None:
        """An accounted connection failed: count it and close it."""
        if not conn.dropped:
            conn.dropped = True
            self.note_error(counter, what)
        conn.close()

    # -- the Worker interface

    def setup(self, deadline: int) -> None:
        o = self.o
        self.connect_many([j for j in self.ids if j % 4 != 3], self._sub_opened, deadline)
        self.connect_many(range(self.index, o.publishers, o.procs), self._pub_opened, deadline)
        self.connect_many(range(self.index, o.pingers, o.procs), self._ping_opened, deadline)
        while any(s.alive and not s.subscribed for s in self.subs):
            now = now_ns()
            if now >= deadline:
                for sub in self.subs:
                    if sub.alive and not sub.subscribed:
                        self.drop(sub, "timeouts", "no +OK to SUB in time")
                break
            for key, mask in self.sel.select(min(0.1, (deadline - now) / 1e9)):
                key.data(mask)

    def _sub_opened(self, sock: socket.socket, sub_id: int) -> None:
        sub = SoakSub(self, sub_id)
        self.subs.append(sub)
        sub.adopt(sock)

    def _pub_opened(self, sock: socket.socket, pub: int) -> None:
        publisher = SoakPub(self, pub)
        self.pubs.append(publisher)
        publisher.adopt(sock)

    def _ping_opened(self, sock: socket.socket, conn_id: int) -> None:
        pinger = Pinger(self)
        self.pingers.append(pinger)
        pinger.adopt(sock)

    def begin(self, now: int) -> None:
        o = self.o
        self.next_tick = now
        for i, pub in enumerate(self.pubs):
            pub.next_t = now + i * pub.interval // len(self.pubs)
            self.call_at(pub.next_t, pub.publish_due)
        for pinger in self.pingers:
            if pinger.alive:
                pinger.ping(now)
        if o.fault_rate > 0:
            interval = int(o.procs / o.fault_rate * 1e9)
            slots = len(FAULTS) * o.procs
            for i, kind in enumerate(FAULTS):  # spread the kinds and processes over an interval
                at = now + interval * (i * o.procs + self.index) // slots
                self.call_at(at, self._fault_due, kind, interval, at)
        span = int((o.warmup + o.duration) / 2 * 1e9)
        for sub_id in self.ids:
            if sub_id % 4 == 3:
                self.call_at(now + self.rng.randrange(span + 1), self._late_sub, sub_id)

    def _late_sub(self, now: int, sub_id: int) -> None:
        if self.sending:
            sub = SoakSub(self, sub_id, late=True)
            self.subs.append(sub)
            sub.open(sub_id)

    def _fault_due(self, now: int, kind: str, interval: int, at: int) -> None:
        if not self.sending:
            return
        for _ in range(BURST if kind == "burst" else 1):
            fault = FAULTS[kind](self, now)
            self.faults.add(fault)
            self.c[f"fault.{kind}.run"] += 1
            fault.start()
        at = max(at + interval, now)
        self.call_at(at, self._fault_due, kind, interval, at)

    def tick(self, now: int) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(timers)
            fn(now, *args)
        if now >= self.next_check:
            self.next_check = now + 100_000_000
            self._check(now)
        self.next_tick = min(timers[0][0] if timers else self.hard_end, self.next_check)

    def _check(self, now: int) -> None:
        """Timeouts: replies, PUB answers, SUB answers, faults."""
        limit = now - self.timeout_ns
        why = f"within {self.o.timeout:g} s"
        for pinger in self.pingers:
            if pinger.alive and pinger.expect and pinger.t < limit:
                self.drop(pinger, "timeouts", f"no +PONG {why}")
        for pub in self.pubs:
            if pub.alive and pub.acks < pub.seq and pub.stamps[pub.acks] < limit:
                self.drop(pub, "timeouts", f"no +OK to PUB {why}")
        for sub in self.subs:
            if sub.alive and not sub.subscribed and sub.connected and sub.t_open < limit:
                self.drop(sub, "timeouts", f"no +OK to SUB {why}")
        for fault in [f for f in self.faults if f.deadline < now]:
            fault.finish("failed", "timeouts", f"{fault.kind}: no outcome {why}")

    def finish(self, now: int) -> None:
        for pub in self.pubs:
            pub.end()

    def idle(self) -> bool:
        if self.faults:
            return False
        if any(p.alive and p.expect for p in self.pingers):
            return False
        if any(p.alive and p.acks < p.expect for p in self.pubs):
            return False
        return all(s.finished() for s in self.subs)

    def expire(self) -> None:
        for pinger in self.pingers:
            if pinger.alive and pinger.expect:
                self.drop(pinger, "timeouts", "no +PONG before the run ended")
        for pub in self.pubs:
            if pub.alive and pub.acks < pub.expect:
                self.drop(pub, "timeouts", f"{pub.expect - pub.acks} PUB(s) never answered")
        for fault in list(self.faults):
            fault.finish("failed", "timeouts", f"{fault.kind}: unfinished when the run ended")
        self.done = True

    def snapshot(self) -> dict[str, Any]:
        self.c["faults_run"] = sum(self.c[f"fault.{kind}.run"] for kind in FAULTS)
        snap = super().snapshot()
        extra: dict[str, Any] = {"hd": self.dhist.state()}
        if self.done:
            extra["pubs"] = {p.pub: p.record() for p in self.pubs}
            extra["subs"] = [r for s in self.subs for r in s.records()]
        snap["x"] = extra
        return snap


def soak_accounting(extras: list[dict[str, Any] | None]) -> dict[str, int]:
    """Expected, delivered and lost deliveries of a soak run, from every client process's
    final report.

    A message is expected at a subscriber when its publisher got ``+OK`` for it (the server
    accepted it) and stamped it after the subscriber's ``+OK`` to SUB arrived: the SUB was
    then done before the PUB was sent (CLOCK_MONOTONIC is one clock for every process of the
    machine). Whatever is expected and did not arrive is lost; messages published earlier
    that arrived anyway are not counted. Each publisher's end marker counts as one message.
    """
    out = {"expected": 0, "delivered": 0, "lost": 0, "incomplete": 0}
    if not extras or any(x is None or "subs" not in x for x in extras):
        out["incomplete"] = 1
        return out
    pubs: dict[int, tuple[int, array.array, bool, int]] = {}
    for x in extras:
        for pub, (accepted, raw, end_ok, end_stamp) in x["pubs"].items():
            stamps = array.array("q")
            stamps.frombytes(raw)
            pubs[pub] = (accepted, stamps, end_ok, end_stamp)
    expected = lost = 0
    for x in extras:
        for pub, t_ok, first, nxt, missing, ended in x["subs"]:
            if pub not in pubs:
                continue  # that publisher never connected: nothing of it was accepted
            accepted, stamps, end_ok, end_stamp = pubs[pub]
            s0 = bisect.bisect_right(stamps, t_ok)
            expected += accepted - s0
            if first < 0:
                lost += accepted - s0
            else:
                lost += (max(0, min(first, accepted) - s0) + max(0, accepted - max(nxt, s0))
                         + sum(1 for s in missing if s0 <= s < accepted))
            if end_ok and end_stamp > t_ok:
                expected += 1
                lost += not ended
    out.update(expected=expected, lost=lost, delivered=expected - lost)
    return out
