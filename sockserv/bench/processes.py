"""The client processes: which worker each runs, forking them, the frames they report
to the parent over a pipe, and reaping them.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys
import time
from typing import Any

from .common import now_ns
from .connrate import ConnRateWorker
from .echo import EchoWorker
from .fanout import FanoutWorker
from .options import Options
from .soak import SoakWorker
from .udp import UdpWorker
from .worker import Worker

__all__ = ["WORKERS", "Child"]

WORKERS: dict[str, type[Worker]] = {
    "echo": EchoWorker, "hold": EchoWorker, "udp": UdpWorker,
    "connrate": ConnRateWorker, "fanout": FanoutWorker,
    "soak": SoakWorker,
}


def _write_frame(fd: int, kind: str, payload: Any) -> None:
    data = pickle.dumps((kind, payload))
    data = struct.pack("!I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _child(opts: Options, index: int, ids: list[int], ctl: int, rep: int) -> None:
    """A client process: setup, wait for the start time, run, report. Never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us
    status = 0
    try:
        worker = WORKERS[opts.mode](opts, index, ids)
        worker.ctl_fd = ctl
        worker.setup(now_ns() + int(opts.setup_timeout * 1e9))
        _write_frame(rep, "ready", worker.ready_info())
        ready, _, _ = select.select([ctl], [], [], opts.setup_timeout + 30)
        data = os.read(ctl, 8) if ready else b""
        if len(data) == 8:
            (t0,) = struct.unpack("!q", data)
            worker.run(t0, ctl, lambda kind, snap: _write_frame(rep, kind, snap))
            _write_frame(rep, "final", worker.snapshot())
            if not worker.ctl_closed:
                # Keep the connections open until the parent has sampled the server at the
                # end of the window (a fork server's children exit when their client leaves).
                wait = max(0.0, (worker.hard_end - now_ns()) / 1e9) + 5
                select.select([ctl], [], [], wait)
        worker.close()
    except BaseException as exc:  # report anything, then leave without running the parent's code
        status = 1
        try:
            _write_frame(rep, "fail", f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
    finally:
        os._exit(status)


class Child:
    """The parent's view of one client process."""

    def __init__(self, pid: int, rep: int, ctl: int) -> None:
        self.pid = pid
        self.rep = rep
        self.ctl: int | None = ctl
        self.buf = b""
        self.ready: dict[str, Any] | None = None
        self.snap: dict[str, Any] | None = None
        self.final = False
        self.failed: str | None = None
        self.eof = False
        self.cpu = 0.0

    def feed(self) -> list[tuple[str, Any]]:
        """Read what is there; return the complete frames."""
        try:
            data = os.read(self.rep, 1 << 20)
        except BlockingIOError:
            return []
        if not data:
            self.eof = True
            return []
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            (n,) = struct.unpack("!I", self.buf[:4])
            if len(self.buf) < 4 + n:
                break
            frames.append(pickle.loads(self.buf[4:4 + n]))
            self.buf = self.buf[4 + n:]
        for kind, payload in frames:
            if kind == "ready":
                self.ready = payload
            elif kind in ("snap", "final"):
                self.snap = payload
                self.final = self.final or kind == "final"
            elif kind == "fail":
                self.failed = payload
        return frames

    def close_ctl(self) -> None:
        """Tell the child to stop (it sees end of file)."""
        if self.ctl is not None:
            os.close(self.ctl)
            self.ctl = None


def _spawn(opts: Options) -> list[Child]:
    children = []
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(opts.procs):
        ids = list(range(index, opts.connections, opts.procs))
        ctl_r, ctl_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ctl_w)
            os.close(rep_r)
            for other in children:
                os.close(other.rep)
                other.close_ctl()
            _child(opts, index, ids, ctl_r, rep_w)
        os.close(ctl_r)
        os.close(rep_w)
        os.set_blocking(rep_r, False)
        children.append(Child(pid, rep_r, ctl_w))
    return children


def _reap(children: list[Child], deadline: float) -> None:
    """Wait for the children; kill (by pid) any still running at ``deadline``."""
    for child in children:
        child.close_ctl()
        while True:
            try:
                pid, _, usage = os.wait4(child.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                child.cpu = usage.ru_utime + usage.ru_stime
                break
            if time.monotonic() >= deadline:
                os.kill(child.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.01)
        os.close(child.rep)
