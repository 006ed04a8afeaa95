"""The fanout workload (push protocol): subscribers that check every message, and one
publisher at a fixed rate.
"""

from __future__ import annotations

import socket
from typing import Any

from .common import READ, STAMP, WRITE, now_ns
from .options import Options
from .payloads import fills
from .report import _publish_target
from .worker import Worker

__all__ = ["Subscriber", "Publisher", "FanoutWorker"]


class Subscriber:
    """One subscriber: checks every MSG is whole, once and in order; measures delivery latency."""

    __slots__ = ("w", "sock", "buf", "subscribed", "next", "missing", "ended", "alive",
                 "sub_sent")

    def __init__(self, worker: FanoutWorker, sock: socket.socket) -> None:
        self.w = worker
        self.sock = sock
        self.buf = b""
        self.subscribed = False
        self.next = 0
        self.missing: set[int] | None = None
        self.ended = False
        self.alive = True
        self.sub_sent = 0

    def on_event(self, mask: int) -> None:
        """MSG lines arrived."""
        w = self.w
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            w.drop_sub(self, "resets", exc)
            return
        now = now_ns()
        if not data:
            w.drop_sub(self, "resets", "subscriber connection closed by the server")
            return
        if w.dgram:
            lines = data.split(b"\n")
            if not lines[-1]:
                lines.pop()
        else:
            if self.buf:
                data = self.buf + data
            lines = data.split(b"\n")
            self.buf = lines.pop()
        prefix = w.prefix
        plen = len(prefix)
        linelen = w.linelen
        fill = w.fills
        ws, we = w.ws, w.we
        record = w.hist.record
        distinct = window = dups = reorders = 0
        for line in lines:
            if len(line) != linelen or not line.startswith(prefix):
                if len(line) == linelen + 1 and line.endswith(b"\r") and line.startswith(prefix):
                    line = line[:-1]
                else:
                    self.odd_line(line)
                    continue
            try:
                seq = int(line[plen + 16:plen + 24], 16)
                stamp = int(line[plen:plen + 16], 16)
            except ValueError:
                seq = -1
            if seq < 0 or not line.endswith(fill[seq % 26]):
                w.note_error("mismatches", f"garbled message: {line[:80]!r}")
                continue
            nxt = self.next
            if seq == nxt:
                self.next = nxt + 1
                distinct += 1
            elif seq > nxt:
                if seq - nxt > 10_000_000:
                    w.note_error("mismatches", f"sequence jumped from {nxt} to {seq}")
                    continue
                if self.missing is None:
                    self.missing = set()
                self.missing.update(range(nxt, seq))
                self.next = seq + 1
                distinct += 1
            elif self.missing and seq in self.missing:
                self.missing.discard(seq)
                reorders += 1
                distinct += 1
            else:
                dups += 1
                continue
            if ws <= now < we:
                record(now - stamp)
                window += 1
        c = w.c
        c["delivered"] += distinct
        c["window"] += window
        if dups:
            c["duplicates"] += dups
        if reorders:
            c["reordered"] += reorders

    def odd_line(self, line: bytes) -> None:
        """Lines other than a well-formed MSG of our channel."""
        w = self.w
        line = line.rstrip(b"\r")
        if line == b"+OK" and not self.subscribed:
            self.subscribed = True
            w.subscribed += 1
        elif line.startswith(w.prefix + b"END."):
            if not self.ended:
                self.ended = True
                w.ended += 1
        elif line.startswith(b"MSG ") and not line.startswith(w.prefix):
            pass  # another channel's message: not ours to check
        else:
            w.note_error("protocol", f"unexpected line {line[:80]!r}")


class Publisher:
    """The one publisher: ``PUB`` at a fixed rate, each payload stamped (time, sequence)."""

    def __init__(self, worker: FanoutWorker, sock: socket.socket) -> None:
        self.w = worker
        self.sock = sock
        self.out: bytes | None = None
        self.buf = b""
        self.seq = 0
        self.acks = 0
        self.expect_acks = 0
        self.next_t = 0
        self.interval = max(1, int(1e9 / worker.o.rate))
        self.head = b"PUB " + worker.o.channel.encode() + b" "

    def send(self, line: bytes) -> None:
        """Queue one command line."""
        self.expect_acks += 1
        if self.out is not None:
            self.out += line
            return
        try:
            done = self.sock.send(line)
        except BlockingIOError:
            done = 0
        except OSError as exc:
            self.w.note_error("resets", exc)
            return
        if done < len(line):
            if self.w.dgram:
                self.w.c["lost"] += 1
                return
            self.out = line[done:]
            self.w.sel.modify(self.sock, READ | WRITE, self.on_event)

    def publish_due(self, now: int) -> None:
        """Publish every message whose time has come (catching up if late)."""
        w = self.w
        fill = w.fills
        while self.next_t <= now:
            seq = self.seq & 0xFFFFFFFF
            self.seq += 1
            self.next_t += self.interval
            self.send(self.head + b"%016x%08x" % (now_ns(), seq) + fill[seq % 26] + b"\n")
            w.c["published"] += 1
            w.c["sent"] += 1

    def on_event(self, mask: int) -> None:
        """Replies to PUB (``+OK``); or room to send."""
        w = self.w
        if mask & WRITE and self.out is not None:
            try:
                done = self.sock.send(self.out)
            except BlockingIOError:
                done = 0
            except OSError as exc:
                w.note_error("resets", exc)
                return
            self.out = self.out[done:] or None
            if self.out is None:
                w.sel.modify(self.sock, READ, self.on_event)
        if not mask & READ:
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            w.note_error("resets", exc)
            w.sel.unregister(self.sock)
            self.expect_acks = self.acks
            return
        if not data:
            w.note_error("resets", "publisher connection closed by the server")
            w.sel.unregister(self.sock)
            self.expect_acks = self.acks
            return
        data = self.buf + data
        lines = data.split(b"\n")
        self.buf = b"" if w.dgram else lines.pop()
        for line in lines:
            if line.rstrip(b"\r") == b"+OK":
                self.acks += 1
            elif line or not w.dgram:
                w.note_error("protocol", f"publisher got {line[:80]!r}")


class FanoutWorker(Worker):
    """fanout: this process's subscribers, and in process 0 the publisher."""

    def __init__(self, opts: Options, index: int, ids: list[int]) -> None:
        super().__init__(opts, index, ids)
        self.dgram = opts.proto == "udp"
        channel = opts.channel.encode()
        self.prefix = b"MSG " + channel + b" "
        self.linelen = len(self.prefix) + opts.size
        self.fills = fills(opts.size - STAMP)
        self.subs: list[Subscriber] = []
        self.live_subs = 0
        self.subscribed = 0
        self.ended = 0
        self.publisher: Publisher | None = None
        self.sub_line = b"SUB " + channel + b"\n"
        for name in ("delivered", "duplicates", "reordered", "published"):
            self.c[name] = 0

    def _new_sub(self, sock: socket.socket, conn_id: int) -> None:
        sub = Subscriber(self, sock)
        self.subs.append(sub)
        self.live_subs += 1
        self.c["connected"] += 1
        self.sel.register(sock, READ, sub.on_event)
        self._send_sub(sub)

    def _send_sub(self, sub: Subscriber) -> None:
        sub.sub_sent = now_ns()
        try:
            sub.sock.send(self.sub_line)
        except OSError as exc:
            self.drop_sub(sub, "resets", exc)

    def setup(self, deadline: int) -> None:
        o = self.o
        if self.dgram:
            for cid in self.ids:
                sock = socket.socket(o.family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                try:
                    if o.sources:
                        sock.bind((o.sources[cid % len(o.sources)], 0))
                    sock.connect(o.addr)
                except OSError as exc:
                    sock.close()
                    self.note_error("connect_errors", exc)
                    continue
                self._new_sub(sock, cid)
        else:
            self.connect_many(self.ids, self._new_sub, deadline)
        while self.subscribed < self.live_subs:
            now = now_ns()
            if now >= deadline:
                for sub in self.subs:
                    if sub.alive and not sub.subscribed:
                        self.drop_sub(sub, "timeouts", "no +OK to SUB in time")
                break
            if self.dgram:  # a datagram may be lost: ask again every 0.5 s
                for sub in self.subs:
                    if sub.alive and not sub.subscribed and now - sub.sub_sent > 500_000_000:
                        self._send_sub(sub)
            for key, mask in self.sel.select(min(0.1, (deadline - now) / 1e9)):
                key.data(mask)
        self.c["subscribers"] = self.subscribed
        if self.index == 0:
            kind = socket.SOCK_DGRAM if self.dgram else socket.SOCK_STREAM
            sock = socket.socket(o.publish_family, kind)
            sock.settimeout(max(0.1, (deadline - now_ns()) / 1e9))
            try:
                sock.connect(o.publish_addr)
            except OSError as exc:
                sock.close()
                raise RuntimeError(f"publisher cannot connect to {_publish_target(o)}: "
                                   f"{exc.strerror or exc}") from None
            sock.setblocking(False)
            if not self.dgram:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.publisher = Publisher(self, sock)
            self.sel.register(sock, READ, self.publisher.on_event)

    def drop_sub(self, sub: Subscriber, counter: str, what: Any) -> None:
        """A subscriber failed: count it and close it."""
        if not sub.alive:
            return
        sub.alive = False
        self.live_subs -= 1
        self.note_error(counter, what)
        if sub.subscribed and not sub.ended and self.c["subscribers"]:
            self.ended += 1  # nothing more will come; the parent counts what it missed as lost
        self.sel.unregister(sub.sock)
        sub.sock.close()

    def ready_info(self) -> dict[str, Any]:
        info = super().ready_info()
        info["subscribed"] = self.subscribed
        return info

    def begin(self, now: int) -> None:
        if self.publisher is not None:
            self.publisher.next_t = now
            self.publisher.publish_due(now)
            self.next_tick = self.publisher.next_t
        else:
            self.next_tick = self.hard_end

    def tick(self, now: int) -> None:
        if self.publisher is not None and self.sending:
            self.publisher.publish_due(now)
            self.next_tick = self.publisher.next_t
        else:
            self.next_tick = self.hard_end

    def finish(self, now: int) -> None:
        if self.publisher is not None:  # the end marker tells every subscriber how many came
            pub = self.publisher
            pub.send(pub.head + b"END.%d\n" % pub.seq)

    def idle(self) -> bool:
        pub = self.publisher
        if pub is not None and pub.acks < pub.expect_acks:
            return False
        return self.ended >= self.subscribed

    def expire(self) -> None:
        pub = self.publisher
        if pub is not None and pub.acks < pub.expect_acks and not self.dgram:
            self.note_error("timeouts", f"{pub.expect_acks - pub.acks} PUB(s) never answered")

    def snapshot(self) -> dict[str, Any]:
        if self.publisher is not None:
            self.c["acks"] = self.publisher.acks
        return super().snapshot()
