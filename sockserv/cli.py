"""``python -m sockserv COMMAND [options]``: parse flags, build the Config, run."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import signal
import socketserver
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, privileges, systemd, tls
from .config import SETTINGS, Config, ConfigError, load_config, to_toml
from .engines import make_server
from .handlers import EchoHandler, Handler
from .log import setup_logging
from .push import PushHandler

__all__ = ["main", "resolve_handler"]

log = logging.getLogger("sockserv")

BUILTIN_SERVICES: dict[str, type] = {"echo": EchoHandler, "push": PushHandler}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            flag = message.split()[2]
            known = ["--" + name.replace("_", "-") for name in SETTINGS]
            close = difflib.get_close_matches(flag.partition("=")[0], known, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        self.exit(2, f"sockserv: error: {message}\n")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    for name, field in SETTINGS.items():
        if name == "service":
            continue
        flag = "--" + name.replace("_", "-")
        parse = field.metadata["parse"]
        help_text = field.metadata["help"]
        if field.default not in (None, ()):
            help_text += f" (default: {field.default})"
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=getattr(parse, "metavar", None) or "VALUE",
                                default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config as TOML (with sources) and exit")


# The server commands: each takes every setting as a flag and runs a server.
SERVER_COMMANDS = {
    "echo": "RFC 862 echo server (default port 7007)",
    "push": "the push server (default port 7070)",
    "serve": "serve a Handler subclass given as MODULE:CLASS",
}

# The client tools: command -> module of this package (or ``module:object`` in it) with
# ``add_arguments(parser)`` and ``main(args) -> int`` (exit status); the first line of its
# docstring is the command's help.
TOOL_COMMANDS: dict[str, str] = {
    "publish": "pushclient:publish",
    "subscribe": "pushclient:subscribe",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sockserv", allow_abbrev=False,
                    description="Classic socket servers: echo, push, your own handlers.")
    parser.add_argument("--version", action="version", version=f"sockserv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SERVER_COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, allow_abbrev=False)
        if name == "serve":
            sub.add_argument("spec", metavar="MODULE:CLASS", help="e.g. myapp.handlers:Upper")
        _add_settings(sub)
    for name, module_name in TOOL_COMMANDS.items():
        module_name, _, attribute = module_name.partition(":")
        module = importlib.import_module(f".{module_name}", __package__)
        if attribute:
            module = getattr(module, attribute)
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0], allow_abbrev=False)
        module.add_arguments(sub)
        sub.set_defaults(tool=module)
    return parser


def resolve_handler(service: str) -> type:
    """The handler class a ``service`` setting names: a built-in, or ``MODULE:CLASS``."""
    if service in BUILTIN_SERVICES:
        return BUILTIN_SERVICES[service]
    module_name, sep, class_name = service.partition(":")
    if not sep or not module_name or not class_name:
        known = ", ".join(BUILTIN_SERVICES)
        raise ConfigError(f"service: {service!r} is neither a built-in service ({known}) "
                          "nor MODULE:CLASS")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"service: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"service: importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in class_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"service: module {module_name!r} has no {class_name!r}")
    if not (isinstance(obj, type) and issubclass(obj, Handler | socketserver.BaseRequestHandler)):
        raise ConfigError(f"service: {service} is not a sockserv.Handler "
                          "(or socketserver.BaseRequestHandler) subclass")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 runtime failure, 2 bad config)."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "tool"):
        return args.tool.main(args)
    flags = {k: v for k, v in vars(args).items() if k in SETTINGS}
    service = args.spec if args.command == "serve" else args.command
    try:
        config = load_config(flags, service=service)
        handler_class = resolve_handler(config.service)
    except ConfigError as exc:
        print(f"sockserv: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_toml(config))
        return 0
    setup_logging(config.log_level)
    return run(config, handler_class)


def _where(config: Config) -> str:
    """What the server binds, for messages: ``tcp 127.0.0.1:7007``, ``unix /run/echo.sock``."""
    if config.unix:
        return f"{'unix' if config.proto == 'tcp' else 'unixgram'} {config.unix}"
    return f"{config.proto} {config.host}:{config.port}"


def _fail(message: Any, status: int) -> int:
    print(f"sockserv: error: {message}", file=sys.stderr)
    return status


def run(config: Config, handler_class: type) -> int:
    """Bind (or adopt the sockets systemd passed), drop privileges, serve until
    SIGTERM/SIGINT, close gracefully. Returns the exit status.

    With a connection passed (systemd ``Accept=yes``, inetd) it serves that one and
    returns. With ``NOTIFY_SOCKET`` set, systemd hears READY, STATUS, RELOADING,
    STOPPING and watchdog pings (see :mod:`sockserv.systemd`)."""
    try:
        identity = privileges.plan(config)
        # Read and check the TLS files now: before binding, and before privileges are
        # dropped (workers and children inherit the context built here).
        tls.server_context(config)
        passed = systemd.activation()
        if passed is not None and passed.connection is not None:
            privileges.drop(identity, config)
            return systemd.serve_inetd(config, handler_class, passed.connection)
        if config.workers > 1 or config.reuse_port:
            return run_workers(config, handler_class, identity, passed)
        server = (systemd.adopt(passed, config, handler_class) if passed is not None
                  else make_server(config, handler_class))
    except ConfigError as exc:
        return _fail(exc, 2)
    except (privileges.SetupError, systemd.ActivationError) as exc:
        return _fail(exc, 1)
    except OSError as exc:
        return _fail(f"cannot bind {_where(config)}: {exc.strerror or exc}", 1)
    config = server.config
    pidfile = privileges.PidFile(config.pidfile) if config.pidfile else None
    try:
        if pidfile is not None:
            pidfile.write()
        privileges.drop(identity, config)  # before the serve loop runs any handler
    except privileges.SetupError as exc:
        server.server_close()
        if pidfile is not None:
            pidfile.remove()
        return _fail(exc, 1)
    service = systemd.Service(server)
    stop = lambda signum, frame: server.request_shutdown()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP,
                  lambda signum, frame: server.call_soon_threadsafe(_reload, server, service))
    log.info("serving %s on %s (engine %s, pid %d)", config.service, server.describe(),
             config.engine, os.getpid())
    service.start()  # READY=1 on the serve loop's first turn
    try:
        with server.signals_wake_loop():  # a signal taken by a handler's thread too
            server.serve_forever()
    finally:
        service.stopping()
        log.info("stopping: closing %d connection(s)", server.live_count())
        server.server_close()
        if pidfile is not None:
            pidfile.remove()
    log.info("stopped")
    return 0


def run_workers(config: Config, handler_class: type, identity: Any,
                passed: systemd.Activation | None = None) -> int:
    """``workers`` > 1: bind once (or adopt the socket systemd passed), drop
    privileges, run the supervisor (see :mod:`sockserv.supervisor`). Returns the exit
    status."""
    from .supervisor import Supervisor

    listener = None
    if passed is not None:  # the supervisor adopts, the workers inherit
        chosen, config = systemd.choose_listener(passed, config)
        listener = chosen.sock
    try:
        supervisor = Supervisor(config, handler_class, listener, reload=reload)
    except OSError as exc:
        return _fail(f"cannot bind {_where(config)}: {exc.strerror or exc}", 1)
    pidfile = privileges.PidFile(config.pidfile) if config.pidfile else None
    try:
        if pidfile is not None:
            pidfile.write()
        privileges.drop(identity, config)
    except privileges.SetupError as exc:
        supervisor.close()
        return _fail(exc, 1)
    service = systemd.Service(supervisor)
    supervisor.on_ready = service.ready
    supervisor.on_stopping = service.stopping
    supervisor.reload_config = lambda sup: _reload(sup, service)  # RELOADING=1 ... READY=1
    service.start(ready=False)
    try:
        return supervisor.run()
    finally:
        if pidfile is not None:
            pidfile.remove()


def _reload(server: Any, service: systemd.Service) -> None:
    """SIGHUP, run in the serve loop: RELOADING=1, reload, READY=1 (Type=notify-reload)."""
    service.reloading()
    try:
        error = reload(server)
    except Exception as exc:
        log.exception("reload failed, keeping the old config")
        error = f"{type(exc).__name__}: {exc}"
    service.reloaded(error)


def reload(server: Any) -> str | None:
    """SIGHUP: re-read the config file and environment; apply what can change live.

    Returns None, or the error when the new config is bad (the old one is kept).
    Flags, and what a passed socket decided (its proto), stay as they were."""
    old: Config = server.config
    flags = {k: getattr(old, k) for k, v in old.sources.items() if v.startswith(("--", "socket "))}
    try:
        new = load_config(flags, service=old.service)
    except ConfigError as exc:
        log.error("reload failed, keeping the old config: %s", exc)
        return str(exc)
    fixed = [name for name, f in SETTINGS.items()
             if not f.metadata["live"] and getattr(new, name) != getattr(old, name)]
    if fixed:
        log.warning("reload: %s need(s) a restart to change", ", ".join(fixed))
        # Load again with the running values pinned, so values derived from them
        # (max_connections from engine, port from service) follow the running ones.
        new = load_config({**flags, **{name: getattr(old, name) for name in fixed}},
                          service=old.service)
        for name in fixed:
            new.sources.pop(name, None)
            if name in old.sources:
                new.sources[name] = old.sources[name]
    changed = [name for name in SETTINGS if getattr(new, name) != getattr(old, name)]
    server.config = new
    setup_logging(new.log_level)
    log.info("reloaded config (changed: %s)", ", ".join(changed) or "nothing")
    return None
