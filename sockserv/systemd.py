"""systemd integration on the standard library alone: socket activation, the
sd_notify protocol, the watchdog.

Socket activation (sd_listen_fds(3)): when ``LISTEN_PID`` is our pid, the
``LISTEN_FDS`` descriptors from fd 3 on, named by ``LISTEN_FDNAMES``, are
adopted instead of binding (:func:`activation`, :func:`choose_listener`,
:func:`adopt`). A connected stream socket (``Accept=yes``; ``systemd`` names it
``connection``), or one on standard input (inetd style), is served alone by
:func:`serve_inetd`, and the process exits when it closes.

Notifications (sd_notify(3)): :class:`Notifier` sends datagrams to
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and does
nothing when it is unset. :class:`Service` speaks for one running server:
``READY=1`` on the serve loop's first turn, ``STATUS=`` refreshed every few
seconds (and at once when the push bus goes up or down), ``RELOADING=1`` with
``MONOTONIC_USEC=`` and then ``READY=1`` around a reload, ``STOPPING=1``, and
``WATCHDOG=1`` every half ``WATCHDOG_USEC`` sent by the serve loop itself after
the server's liveness check, so a hung loop stops the pings and systemd restarts
the service.

Hooks for a supervisor of worker processes: call :func:`activation` and
:func:`choose_listener` once in the supervisor (or bind), build each worker's
server with ``ServerClass.from_socket(sock, handler, config=config)``, and run
a :class:`Service` on the supervisor's loop with ``start(ready=False)``, calling
:meth:`Service.ready` once every worker is up; anything with ``healthy()``,
``timers.call_at`` and ``call_soon_threadsafe`` can host it (a ServerMixin
server has them). :func:`notify` is the one-shot form.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from .config import Config
from .connection import format_address
from .engines import ENGINES

__all__ = [
    "ActivationError", "Activation", "Notifier", "PassedSocket", "Service", "activation", "adopt",
    "choose_listener", "listen_fds", "notify", "serve_inetd", "watchdog_usec",
]

log = logging.getLogger("sockserv")

SD_LISTEN_FDS_START = 3
STATUS_INTERVAL = 5.0  # seconds between STATUS= refreshes
NOTIFY_TIMEOUT = 1.0  # the longest a notification may block the serve loop


class ActivationError(Exception):
    """The sockets passed by the service manager cannot be used; one line for the user."""


# -- socket activation ---------------------------------------------------------------


@dataclasses.dataclass
class PassedSocket:
    """One socket passed by the service manager (or inetd) and what it is."""

    fd: int
    name: str
    sock: socket.socket
    listening: bool  #: a stream socket that accepts (SO_ACCEPTCONN)
    connected: bool  #: a stream socket with a peer: one connection (Accept=yes)

    @property
    def proto(self) -> str:
        """``tcp`` for a stream socket, ``udp`` for a datagram one (Unix sockets too)."""
        return "udp" if self.sock.type == socket.SOCK_DGRAM else "tcp"

    def describe(self) -> str:
        kind = self.proto
        if self.sock.family == socket.AF_UNIX:
            kind = "unix" if kind == "tcp" else "unixgram"
        try:
            where = format_address(self.sock.getsockname())
        except OSError:
            where = "?"
        return f"fd {self.fd} ({self.name}): {kind} {where}"


@dataclasses.dataclass
class Activation:
    """What the service manager passed: listening sockets, or one connection."""

    listeners: list[PassedSocket]
    connection: PassedSocket | None = None
    source: str = "systemd"  #: ``systemd`` (LISTEN_FDS) or ``stdin`` (inetd style)


def _examine(fd: int, name: str) -> PassedSocket | None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    if not stat.S_ISSOCK(mode):
        return None
    sock = socket.socket(fileno=fd)  # family, type and protocol come from the descriptor
    if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM) or \
            sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        sock.detach()
        return None
    listening = connected = False
    if sock.type == socket.SOCK_STREAM:
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if not listening:
            try:
                sock.getpeername()
                connected = True
            except OSError:
                pass
    return PassedSocket(fd, name, sock, listening, connected)


def listen_fds(environ: MutableMapping[str, str] | None = None, *,
               unset: bool = True) -> list[PassedSocket]:
    """The sockets passed by socket activation (``sd_listen_fds_with_names``).

    Only when ``LISTEN_PID`` is this process: descriptors 3 .. 3+``LISTEN_FDS``-1,
    each named by ``LISTEN_FDNAMES`` (colon-separated; ``unknown`` when unset), with
    CLOEXEC set so that programs we run do not inherit them. Descriptors that are
    not TCP/UDP/Unix stream or datagram sockets (a FIFO, a netlink socket) are left
    alone and logged. With ``unset`` (the default) ``LISTEN_PID``, ``LISTEN_FDS``
    and ``LISTEN_FDNAMES`` are removed from ``environ``, so children do not misread
    them. Raises :class:`ActivationError` when the variables are malformed.
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid or not pid.strip().isdigit() or int(pid) != os.getpid():
        return []
    if not count or not count.strip().isdigit():
        raise ActivationError(f"socket activation: LISTEN_FDS={count!r} is not a number")
    n = int(count)
    labels = names.split(":") if names else ["unknown"] * n
    if len(labels) != n:
        raise ActivationError(f"socket activation: LISTEN_FDNAMES names {len(labels)} "
                              f"socket(s) but LISTEN_FDS={n}")
    passed = []
    for fd, name in zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n), labels, strict=True):
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"socket activation: fd {fd} ({name}): "
                                  f"{exc.strerror or exc}") from None
        found = _examine(fd, name)
        if found is None:
            log.warning("socket activation: ignoring fd %d (%s): not a TCP, UDP or Unix "
                        "stream or datagram socket", fd, name)
        else:
            passed.append(found)
    return passed


def _stdin_socket() -> PassedSocket | None:
    """inetd style: a socket on standard input, when it was put there for us.

    An IP socket, or a Unix socket bound to a name; an anonymous socket pair (what
    ssh and some process managers give a command as stdin) is not taken."""
    try:
        if not stat.S_ISSOCK(os.fstat(0).st_mode):
            return None
    except OSError:
        return None
    found = _examine(os.dup(0), "stdin")
    if found is None:
        return None
    ours = os.fstat(found.fd)
    found.fd = 0  # as the user knows it
    try:
        local = found.sock.getsockname()
    except OSError:
        local = None
    if found.sock.family == socket.AF_UNIX and not local:
        found.sock.close()
        return None
    if not (found.listening or found.connected or found.sock.type == socket.SOCK_DGRAM):
        found.sock.close()
        return None
    # Keep our own descriptor; stdin, and stdout/stderr when they are the same socket,
    # go to /dev/null, so a stray print() cannot write into the connection.
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return found


def activation(environ: MutableMapping[str, str] | None = None) -> Activation | None:
    """The sockets this process was started with, or None when it should bind.

    ``LISTEN_FDS`` (see :func:`listen_fds`) first: a connected socket among them
    means ``Accept=yes`` (one connection to serve; the others are closed), else
    they are listeners. Without ``LISTEN_FDS``, a socket on standard input (inetd
    style): a connection, or a listening / datagram socket to serve.
    """
    passed = listen_fds(environ)
    if passed:
        connections = [p for p in passed if p.connected]
        if connections:
            for other in passed:
                if other is not connections[0]:
                    other.sock.close()
            return Activation([], connections[0])
        return Activation(passed)
    stdin = _stdin_socket()
    if stdin is None:
        return None
    if stdin.connected:
        return Activation([], stdin, source="stdin")
    return Activation([stdin], source="stdin")


def fd_name(service: str) -> str:
    """The ``FileDescriptorName=`` that picks a socket for ``service``: the service
    itself (``echo``, ``push``), or ``MODULE:CLASS`` with the colon made a dot."""
    return service.replace(":", ".")


def choose_listener(passed: Activation | Sequence[PassedSocket],
                    config: Config) -> tuple[PassedSocket, Config]:
    """Pick the socket this server serves, and the config that goes with it.

    The naming rule: one socket is served whatever its name. Among several, the
    candidates narrow, step by step while more than one is left, to those named
    (``FileDescriptorName=``, ``--fdname``) after the service (:func:`fd_name`:
    ``echo``, ``push``, ``myapp.handlers.Upper``), then to those named after the
    ``proto`` setting (``tcp`` or ``udp``), then to those of the proto's type
    (stream for tcp, datagram for udp); a step that would leave none is skipped.
    One left is served; otherwise :class:`ActivationError`. The sockets not chosen
    are closed in this process (systemd keeps its own copies).

    The chosen socket's type sets ``proto`` in the returned config (a datagram
    socket serves as ``udp``), shown by the source ``socket fd N from systemd``.
    """
    listeners = list(passed.listeners if isinstance(passed, Activation) else passed)
    if not listeners:
        raise ActivationError("socket activation: no listening socket was passed")
    candidates = listeners
    for keep in (lambda p: p.name == fd_name(config.service),
                 lambda p: p.name == config.proto,
                 lambda p: p.proto == config.proto):
        if len(candidates) == 1:
            break
        narrowed = [p for p in candidates if keep(p)]
        if narrowed:
            candidates = narrowed
    if len(candidates) != 1:
        found = "; ".join(p.describe() for p in listeners)
        raise ActivationError(
            f"socket activation: {len(candidates)} of the passed sockets could serve "
            f"{config.service} over {config.proto} ({found}); name the one to serve "
            f"FileDescriptorName={fd_name(config.service)}")
    chosen = candidates[0]
    for other in listeners:
        if other is not chosen:
            log.info("socket activation: not serving %s", other.describe())
            other.sock.close()
    source = f"socket fd {chosen.fd} from systemd" if chosen.name != "stdin" else \
        "socket on stdin"
    if chosen.proto != config.proto and "proto" in config.sources:
        log.warning("proto %s (from %s) ignored: the passed socket is %s", config.proto,
                    config.sources["proto"], chosen.describe())
    config = config.replace(proto=chosen.proto, sources={**config.sources, "proto": source})
    return chosen, config


def adopt(passed: Activation, config: Config, handler_class: type) -> Any:
    """The server of ``config.engine`` built around the passed socket that
    :func:`choose_listener` picks (nothing is bound, ``listen()`` is not called
    again on a listening socket)."""
    chosen, config = choose_listener(passed, config)
    server = ENGINES[config.engine, config.proto].from_socket(chosen.sock, handler_class,
                                                              config=config)
    log.info("using the socket %s: %s", "passed by systemd" if passed.source == "systemd"
             else "on stdin (inetd)", chosen.describe())
    return server


def serve_inetd(config: Config, handler_class: type, conn: PassedSocket,
                notifier: Notifier | None = None) -> int:
    """Serve one passed connection (``Accept=yes``, or inetd style on stdin) with
    ``handler_class`` in this process until it closes; returns the exit status, 0.

    SIGTERM and SIGINT end the connection's input (the handler sees end of input,
    flushes and closes); SIGHUP is ignored. With ``NOTIFY_SOCKET`` set, READY=1
    and STOPPING=1 are sent around it.
    """
    sock = conn.sock
    # One connection per process: no relay, and no bus either (no loop runs its messages).
    server = ENGINES[config.engine, "tcp"](sock.getsockname(), handler_class, False,
                                           config=config.replace(bus=None))
    server.socket.close()  # nothing is bound: the connection is all there is

    def end_input(signum: int, frame: Any) -> None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, end_input)
    signal.signal(signal.SIGINT, end_input)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    notifier = notifier if notifier is not None else Notifier()
    try:
        peer = sock.getpeername()
    except OSError:
        peer = ""
    log.info("serving %s on one connection from %s (%s, pid %d)", config.service,
             format_address(peer), "Accept=yes" if conn.name != "stdin" else "inetd",
             os.getpid())
    notifier.send("READY=1", f"STATUS=serving {format_address(peer)}")
    try:
        server.serve_connection(sock, peer)
    finally:
        notifier.send("STOPPING=1")
        server.server_close()
    return 0


# -- sd_notify --------------------------------------------------------------------------


def _notify_address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """An sd_notify client for ``NOTIFY_SOCKET``: a filesystem path, or ``@name`` in
    the abstract namespace; without it every :meth:`send` is a no-op. Other forms
    (``vsock:``) are not supported and are logged once."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        self.name = value
        self.address = _notify_address(value)
        self._failed: set[int] = set()
        if value and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a path or @abstract name; not notifying",
                        value)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; True if it was sent. Never raises;
        blocks at most ``NOTIFY_TIMEOUT`` seconds when the receiver's queue is full."""
        if self.address is None:
            return False
        message = ("\n".join(fields) + "\n").encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(NOTIFY_TIMEOUT)
                sock.sendto(message, self.address)
            self._failed.clear()
            return True
        except OSError as exc:
            if exc.errno not in self._failed:  # once per kind of failure, not once per ping
                self._failed.add(exc.errno or 0)
                log.warning("sd_notify to %s failed: %s", self.name, exc.strerror or exc)
            return False


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification, e.g. ``notify("READY=1", "STATUS=up")``; a no-op (False)
    without ``NOTIFY_SOCKET``."""
    return Notifier(environ).send(*fields)


def watchdog_usec(environ: Mapping[str, str] | None = None) -> int | None:
    """``WATCHDOG_USEC`` when the watchdog applies to this process (sd_watchdog_enabled):
    set and positive, and ``WATCHDOG_PID`` unset or our pid. None otherwise."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.strip().isdigit() or int(usec) <= 0:
        return None
    if pid and (not pid.strip().isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _bus(server: Any) -> Any:
    """The node's push bus (``server.hub.bus``, see :mod:`sockserv.bus`), or None."""
    return getattr(getattr(server, "hub", None), "bus", None)


def _subscribers(server: Any) -> int | None:
    """Subscribers of the server's push hub (``server.hub.subscriber_count()``), when
    its handler uses the hub or anyone subscribed; None otherwise."""
    count = getattr(getattr(server, "hub", None), "subscriber_count", None)
    if callable(count):
        count = count()
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    uses_hub = getattr(getattr(server, "handler_class", None), "uses_hub", False)
    return count if uses_hub or count else None


class Service:
    """The systemd side of one running server (any ServerMixin server, or a supervisor
    offering ``timers``, ``call_soon_threadsafe`` and ``healthy()``).

    :meth:`start` schedules, on the server's own loop: ``READY=1`` on its first turn
    (unless ``ready=False``: then call :meth:`ready` yourself), a ``STATUS=`` line
    every ``status_interval`` seconds when it changed, and with the watchdog on
    (:func:`watchdog_usec`) ``WATCHDOG=1`` every half interval after
    ``server.healthy()`` says yes. :meth:`reloading` / :meth:`reloaded` bracket a
    reload, :meth:`stopping` starts the end.
    """

    def __init__(self, server: Any, *, environ: MutableMapping[str, str] | None = None,
                 status_interval: float = STATUS_INTERVAL) -> None:
        env = os.environ if environ is None else environ
        self.server = server
        self.notifier = Notifier(env)
        usec = watchdog_usec(env)
        self.watchdog_interval = usec / 2e6 if usec else None
        if usec:
            # Pin the watchdog to this process: forked children and workers, which
            # inherit the environment, must not think it is theirs.
            env["WATCHDOG_PID"] = str(os.getpid())
        self.status_interval = status_interval
        self.note = ""  #: appended to STATUS=, e.g. a failed reload
        self._last_status: str | None = None
        self._stopping = False

    def _at(self, delay: float, callback: Any) -> None:
        self.server.timers.call_at(time.monotonic() + delay, callback)

    def start(self, ready: bool = True) -> None:
        """Schedule READY (first loop turn), STATUS refreshes and watchdog pings."""
        if ready:
            self.server.call_soon_threadsafe(self.ready)
        if self.notifier.enabled:
            self._at(self.status_interval, self._refresh)
            bus = _bus(self.server)
            if bus is not None:  # the bus going up or down shows at once
                bus.on_state = lambda state: self._update_status()
        if self.watchdog_interval:
            log.info("systemd watchdog: pinging every %.3gs", self.watchdog_interval)
            self.server.call_soon_threadsafe(self._ping)

    def status(self) -> str:
        """The one-line ``STATUS=`` summary: address, connections, subscribers."""
        server = self.server
        stats = server.stats.snapshot() if hasattr(server, "stats") else {}
        describe = getattr(server, "describe", None)
        service = getattr(getattr(server, "config", None), "service", "sockserv")
        text = f"{service} on {describe()}" if describe else service
        if stats:
            text += (f": {stats.get('connections_active', 0)} open, "
                     f"{stats.get('connections_total', 0)} served")
        supervisor = not stats and hasattr(server, "workers") and hasattr(server, "live_count")
        if supervisor:
            text += f": {server.live_count()} workers"
        # A supervisor's own hub has no subscribers: its workers hold them.
        subscribers = None if supervisor else _subscribers(server)
        if subscribers is not None:
            text += f", {subscribers} subscribers"
        bus = _bus(server)
        if bus is not None:
            text += f", {bus.describe()}"
        if self.note:
            text += f"; {self.note}"
        return " ".join(text.split())  # one line, whatever a note held

    def ready(self) -> None:
        """READY=1 (with MAINPID= and the first STATUS=)."""
        self._last_status = self.status()
        self.notifier.send("READY=1", f"STATUS={self._last_status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC= in the same message (Type=notify-reload)."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                           "STATUS=reloading the configuration")

    def reloaded(self, error: str | None = None) -> None:
        """READY=1 after a reload; ``error`` (the reload failed, the old config is
        kept) stays in STATUS= until the next reload."""
        self.note = f"reload failed: {error}" if error else ""
        self._last_status = self.status()
        self.notifier.send("READY=1", f"STATUS={self._last_status}")

    def stopping(self) -> None:
        """STOPPING=1: the shutdown begins. STATUS refreshes end; watchdog pings go on
        as long as a loop runs them (the select engine's loop drains connections)."""
        self._stopping = True
        count = self.server.live_count() if hasattr(self.server, "live_count") else 0
        self.notifier.send("STOPPING=1", f"STATUS=stopping: closing {count} connection(s)")

    def _refresh(self) -> None:
        if self._stopping:
            return
        self._update_status()
        self._at(self.status_interval, self._refresh)

    def _update_status(self) -> None:
        """Send STATUS= if it changed (not once stopping)."""
        if self._stopping:
            return
        try:
            text = self.status()
            if text != self._last_status:
                self._last_status = text
                self.notifier.send(f"STATUS={text}")
        except Exception:
            log.exception("systemd: building STATUS failed")

    def _ping(self) -> None:
        try:
            healthy = getattr(self.server, "healthy", None)
            if healthy is None or healthy():
                self.notifier.send("WATCHDOG=1")
            else:
                log.warning("systemd watchdog: the server is not healthy; not pinging")
        except Exception:
            log.exception("systemd watchdog: the liveness check failed; not pinging")
        self._at(self.watchdog_interval, self._ping)
