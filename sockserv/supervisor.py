"""Pre-forked workers (``workers = N``): one supervisor process binds (or is handed
the sockets), forks N workers that each run the configured engine on the shared
listener, and keeps N of them running.

Like gunicorn's arbiter, and small: signals only append to a queue and wake the
one supervisor loop, which also reaps workers through pidfds, runs timers and
restarts. A worker that dies is replaced at once; one that dies within a second
of its start is replaced after a delay doubling from 0.1 s to 10 s, so a crash
loop is slowed down, not spun.

Signals to the supervisor: SIGTERM/SIGINT stop (workers get SIGTERM, then
SIGKILL after ``shutdown_timeout``), SIGHUP reloads the config and replaces the
workers (new ones start before the old ones drain), SIGTTIN/SIGTTOU add or
remove a worker.

With ``reuse_port`` each worker binds a socket of its own with SO_REUSEPORT. The
kernel then hashes each new connection to one worker; a worker at
``max_connections`` closes its listener, so nothing queues for it, and opens it
again when a slot frees. Without it every worker accepts from the one shared
socket (registered with EPOLLEXCLUSIVE, so a connection wakes one worker).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .background import SERVER_SIGNALS
from .config import Config
from .engines import ENGINES
from .engines.listeners import UnixPath, bind_listener
from .push import Hub, Ticker
from .relay import Relay
from .timers import Timers

__all__ = ["Supervisor"]

log = logging.getLogger("sockserv")

FAST_EXIT = 1.0  # a worker dying this soon after its start counts towards a crash loop
MAX_RESTART_DELAY = 10.0


class Worker:
    """What the supervisor knows of one worker process."""

    __slots__ = ("pid", "pidfd", "started", "generation", "ready", "stopping")

    def __init__(self, pid: int, pidfd: int, generation: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.started = time.monotonic()
        self.generation = generation
        self.ready = False
        self.stopping = False


class Supervisor:
    """Runs ``config.workers`` worker processes of one server and keeps them running.

    A caller uses ``Supervisor(config, handler_class, listener=None).run()`` -> exit
    status; ``listener`` is a socket bound elsewhere (systemd); without one the
    supervisor binds (``OSError`` from the constructor: port in use and the like).
    ``on_ready`` is called once when every first worker serves, ``on_stopping`` when
    the stop begins; ``reload(self)`` (given by the CLI) re-reads the config into
    ``self.config``.

    For the systemd integration it offers what a server offers: ``config``,
    ``timers``, ``call_soon_threadsafe``, ``healthy()``, ``describe()``,
    ``live_count()`` (workers running).
    """

    def __init__(self, config: Config, handler_class: type, listener: socket.socket | None = None,
                 *, reload: Callable[[Any], Any] | None = None,
                 on_ready: Callable[[], Any] | None = None,
                 on_stopping: Callable[[], Any] | None = None) -> None:
        self.config = config
        self.handler_class = handler_class
        self.reload_config = reload
        self.on_ready = on_ready
        self.on_stopping = on_stopping
        self.unix_path: UnixPath | None = None  # a socket file bound here, removed at close
        if listener is None:
            listener = bind_listener(config, reuse_port=config.reuse_port)
            if config.unix:
                self.unix_path = UnixPath(config.unix)
            if config.reuse_port:  # each worker binds its own; this one only proved the port free
                self.address = listener.getsockname()
                listener.close()
                listener = None
        self.listener = listener
        self.address = listener.getsockname() if listener is not None else self.address
        self.timers = Timers()
        self.workers: dict[int, Worker] = {}
        self.target = config.workers
        self.generation = 0
        self._calls: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._signals: deque[int] = deque()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)
        self._selector.register(self._ready_r, selectors.EVENT_READ, self._read_ready)
        self._restart_delay = 0.0
        self._next_spawn = 0.0
        self._stopping = False
        self._announced = False
        # Push across workers: a PUB in one worker reaches the subscribers of every other
        # one through the relay; the supervisor itself runs the tick, once for all.
        self.hub = Hub()
        self.relay = Relay(self.hub, self) if getattr(handler_class, "uses_hub", False) else None
        if self.relay is not None and config.tick:
            Ticker(self, config.tick).start()
        # Across nodes (bus): the supervisor speaks for the node; workers never hold it.
        self.bus: Any = None
        if config.bus and self.relay is None:
            log.warning("bus: ignored, %s does not use the push hub", config.service)
        elif config.bus:
            from .bus import RedisBus

            self.bus = RedisBus.from_config(config, self, self.relay.deliver_remote)
            self.hub.bus = self.bus
            self.bus.start()

    # -- what the systemd integration uses -------------------------------------------

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))
        self._wakeup()

    def healthy(self) -> bool:
        """Every worker that should run runs (the loop itself answering is the rest)."""
        return self._stopping or sum(not w.stopping for w in self.workers.values()) >= self.target

    def describe(self) -> str:
        from .connection import format_address

        proto = self.config.proto
        if self.listener is not None and self.listener.family == socket.AF_UNIX:
            proto = "unix" if proto == "tcp" else "unixgram"
        return f"{proto} {format_address(self.address)}"

    def live_count(self) -> int:
        return len(self.workers)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the supervisor loop when ``fd`` is readable (the relay)."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        self._selector.unregister(fd)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0)."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in SERVER_SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        log.info("supervisor %d: %d %s worker(s) on %s", os.getpid(), self.target,
                 self.config.engine, self.describe())
        try:
            self._maintain()
            while self.workers or not self._stopping:
                self._run_once()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.close()
        log.info("supervisor %d: stopped", os.getpid())
        return 0

    def _run_once(self) -> None:
        timeout = 0.0 if (self._calls or self._signals) else self._next_timeout()
        for key, _ in self._selector.select(timeout):
            key.data()
        while self._signals:
            self._handle_signal(self._signals.popleft())
        self.timers.run_due(time.monotonic())
        while self._calls:
            fn, args = self._calls.popleft()
            fn(*args)
        self._maintain()

    def _next_timeout(self) -> float | None:
        deadlines = [d for d in (self.timers.next_deadline(),) if d is not None]
        if not self._stopping and self._live_target() < self.target:
            deadlines.append(self._next_spawn)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)  # the wakeup fd wakes the loop

    def _wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop()
        elif signum == signal.SIGHUP:
            self._reload()
        elif signum == signal.SIGTTIN and self.target < 64:
            self.target += 1
            log.info("SIGTTIN: %d worker(s)", self.target)
        elif signum == signal.SIGTTOU and self.target > 1:
            self.target -= 1
            log.info("SIGTTOU: %d worker(s)", self.target)

    # -- workers ------------------------------------------------------------------------

    def _live_target(self) -> int:
        """Workers of the current generation that are not being stopped."""
        return sum(1 for w in self.workers.values()
                   if not w.stopping and w.generation == self.generation)

    def _maintain(self) -> None:
        if self._stopping:
            return
        current = [w for w in self.workers.values()
                   if not w.stopping and w.generation == self.generation]
        for worker in sorted(current, key=lambda w: w.started)[self.target:]:
            self._stop_worker(worker)  # SIGTTOU: the newest go first
        now = time.monotonic()
        while len(current) < self.target and now >= self._next_spawn:
            current.append(self._spawn())

    def _spawn(self) -> Worker:
        # A signal sent to a new worker before it has its own handlers must wait for
        # them, not be lost: block the stop signals across fork, the worker unblocks.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = os.fork()
        if pid == 0:
            self._worker_main(blocked)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if self.relay is not None:
            self.relay.adopt(pid)
        worker = Worker(pid, os.pidfd_open(pid), self.generation)
        self.workers[pid] = worker
        self._selector.register(worker.pidfd, selectors.EVENT_READ, lambda: self._reap(worker))
        return worker

    def _reap(self, worker: Worker) -> None:
        self._selector.unregister(worker.pidfd)
        os.close(worker.pidfd)
        del self.workers[worker.pid]
        if self.relay is not None:
            self.relay.detach(worker.pid)
        try:
            _, status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            status = 0
        if worker.stopping or self._stopping:
            return
        how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        if time.monotonic() - worker.started < FAST_EXIT:
            self._restart_delay = min(MAX_RESTART_DELAY, max(0.1, self._restart_delay * 2))
        else:
            self._restart_delay = 0.0
        self._next_spawn = time.monotonic() + self._restart_delay
        log.warning("worker %d %s; starting another%s", worker.pid, how,
                    f" in {self._restart_delay:.1f}s" if self._restart_delay else "")

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        for line in data.split():
            worker = self.workers.get(int(line))
            if worker is not None:
                worker.ready = True
        if not self._announced and self._live_target() >= self.target and all(
                w.ready for w in self.workers.values() if w.generation == self.generation):
            self._announced = True
            log.info("supervisor %d: %d worker(s) serving", os.getpid(), self.target)
            if self.on_ready is not None:
                self.on_ready()

    def _stop_worker(self, worker: Worker, signum: int = signal.SIGTERM) -> None:
        worker.stopping = True
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass

    def _reload(self) -> None:
        if self.reload_config is not None:
            self.reload_config(self)
        self.target = self.config.workers
        old = [w for w in self.workers.values() if not w.stopping]
        self.generation += 1
        self._restart_delay = self._next_spawn = 0.0
        for _ in range(self.target):
            self._spawn()
        for worker in old:  # the new ones share the listener: nothing is refused meanwhile
            self._stop_worker(worker)

    def stop(self) -> None:
        """Stop every worker gracefully; SIGKILL the ones still running after
        ``shutdown_timeout`` (plus a second for their own escalation)."""
        if self._stopping:
            return
        self._stopping = True
        if self.on_stopping is not None:
            self.on_stopping()
        log.info("supervisor %d: stopping %d worker(s)", os.getpid(), len(self.workers))
        for worker in list(self.workers.values()):
            self._stop_worker(worker)
        self.timers.call_at(time.monotonic() + self.config.shutdown_timeout + 1.0, self._kill_all)

    def _kill_all(self) -> None:
        for worker in list(self.workers.values()):
            log.warning("worker %d did not stop in time: killing it", worker.pid)
            self._stop_worker(worker, signal.SIGKILL)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
        if self.relay is not None:
            self.relay.close()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w, self._ready_r, self._ready_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.listener is not None:
            self.listener.close()
        if self.unix_path is not None:
            self.unix_path.remove()

    # -- in the worker ------------------------------------------------------------------

    def _worker_main(self, sigmask: set[int]) -> None:
        """The life of one worker: serve the listener with the configured engine, _exit.
        It starts with SIGTERM and SIGINT blocked; ``sigmask`` is the mask to restore."""
        status = 1
        stop_requested: list[int] = []
        try:
            signal.set_wakeup_fd(-1)
            for signum in SERVER_SIGNALS:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    # Not SIG_IGN, even for a moment: that would discard a pending stop.
                    signal.signal(signum, lambda signum, frame: stop_requested.append(signum))
                else:
                    signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
            ready_w = self._ready_w
            if self.bus is not None:
                self.bus.forget()  # the supervisor's: this worker reaches it through the relay
            self._selector.close()
            for fd in (self._wake_r, self._wake_w, self._ready_r,
                       *(w.pidfd for w in self.workers.values())):
                os.close(fd)
            config = self.config
            cls = ENGINES[config.engine, config.proto]
            if config.reuse_port:
                sock = bind_listener(config.replace(port=self.address[1]), reuse_port=True)
            else:
                sock = self.listener
            # The supervisor ticks, and holds the bus, for the whole node.
            worker_config = config.replace(tick=0.0, bus=None)
            server = cls.from_socket(sock, self.handler_class, config=worker_config)
            server.shared_listener = not config.reuse_port
            server.own_listener = config.reuse_port
            if self.relay is not None:
                self.relay.become_child(hub=server.hub, loop=server)
            stop = lambda signum, frame: server.request_shutdown()  # noqa: E731
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            if stop_requested:  # asked to stop while starting
                server.request_shutdown()
            os.write(ready_w, b"%d\n" % os.getpid())
            os.close(ready_w)
            with server.signals_wake_loop():  # a signal taken by a connection's thread too
                server.serve_forever()
            server.server_close()
            if self.relay is not None:
                self.relay.child_exit()
            status = 0
        except Exception:
            log.exception("worker %d failed", os.getpid())
        finally:
            os._exit(status)
