"""One declaration per setting, feeding the CLI, the TOML file, the environment and validation.

Precedence: defaults < ``--config FILE`` (TOML, top-level keys) < ``SOCKSERV_<KEY>`` < flags.
Each setting is a field of the frozen dataclass :class:`Config`; its metadata holds
the parser (which also validates) and the one-line help.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import pwd
import resource
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from .access import parse_networks

__all__ = ["Config", "ConfigError", "SETTINGS", "load_config", "to_toml"]

ENV_PREFIX = "SOCKSERV_"
DEFAULT_PORTS = {"echo": 7007, "push": 7070}
DEFAULT_MAX_CONNECTIONS = {"select": 0, "thread": 1000, "fork": 256}  # 0: from RLIMIT_NOFILE


def descriptor_limit() -> int:
    """Connections one process can hold: its RLIMIT_NOFILE less a reserve for other files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, soft - 100) if soft != resource.RLIM_INFINITY else 1 << 20


class ConfigError(Exception):
    """A setting or config file is wrong; the message is one line for the user."""


# -- parsers: take a str (env, flag) or a TOML value, return the typed value or raise ValueError


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _named(parse: Callable[[Any], Any], metavar: str) -> Callable[[Any], Any]:
    """The same parser, shown as ``metavar`` in --help."""

    def wrapped(value: Any) -> Any:
        return parse(value)

    wrapped.metavar = metavar  # type: ignore[attr-defined]
    return wrapped


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    parse.metavar = "|".join(choices)  # type: ignore[attr-defined]
    return parse


def _integer(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip().replace("_", ""), 0)
            except ValueError:
                raise ValueError(f"{value!r} is not an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo}-{hi}" if hi is not None else f"{lo} or more"
            raise ValueError(f"{value} is out of range {bounds}")
        return value

    parse.metavar = "N"  # type: ignore[attr-defined]
    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number of seconds")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{value} is out of range 0 or more")
    return float(value)


_seconds.metavar = "SECONDS"  # type: ignore[attr-defined]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is not a boolean (true or false)")


def _account(kind: str) -> Callable[[Any], str]:
    """A user (or group) that exists: a name, or a number (uid/gid) given as text."""

    def parse(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        value = _text(value).strip()
        try:
            if value.isdigit():
                (pwd.getpwuid if kind == "user" else grp.getgrgid)(int(value))
            else:
                (pwd.getpwnam if kind == "user" else grp.getgrnam)(value)
        except (KeyError, OverflowError):
            raise ValueError(f"no such {kind} {value!r}") from None
        return value

    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """None (or an empty string from env/CLI) means: derive the value from other settings."""

    def wrapped(value: Any) -> Any:
        return None if value is None or value == "" else parse(value)

    wrapped.metavar = getattr(parse, "metavar", None)  # type: ignore[attr-defined]
    return wrapped


def _unix_path(value: Any) -> str:
    """A filesystem path for a Unix socket: the kernel takes at most 107 bytes."""
    value = _text(value)
    if "\0" in value:
        raise ValueError(f"{value!r} contains a NUL byte")
    if len(os.fsencode(value)) > 107:
        raise ValueError(f"{value!r} is longer than the 107 bytes a Unix socket path may have")
    return value


_unix_path.metavar = "PATH"  # type: ignore[attr-defined]


def _octal_mode(value: Any) -> str:
    """Permission bits in octal, as chmod takes them: ``"660"`` (a string, also in TOML)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string of octal digits (write it as \"660\")")
    digits = value.strip().removeprefix("0o")
    if not 1 <= len(digits) <= 4 or any(c not in "01234567" for c in digits) \
            or int(digits, 8) > 0o777:
        raise ValueError(f"{value!r} is not a permission mode in octal, 0 to 777 (e.g. 660)")
    return format(int(digits, 8), "03o")


_octal_mode.metavar = "MODE"  # type: ignore[attr-defined]


def _bus_url(value: Any) -> str:
    """A ``redis://`` or ``rediss://`` URL (see :func:`sockserv.bus.parse_url`)."""
    from .bus import parse_url  # only when a bus is configured

    parse_url(value)
    return value


_bus_url.metavar = "URL"  # type: ignore[attr-defined]


def setting(default: Any, parse: Callable[[Any], Any], help: str, *, live: bool = False) -> Any:
    """Declare one setting: a dataclass field carrying its parser and help."""
    return dataclasses.field(default=default, metadata={"parse": parse, "help": help, "live": live})


@dataclasses.dataclass(frozen=True)
class Config:
    """The effective settings of one server. Build it with :func:`load_config`
    (file, env, flags) or directly, e.g. ``Config(port=0, engine="fork")``;
    every value is validated either way."""

    service: str = setting("echo", _text, "what to serve: echo or MODULE:CLASS of a Handler "
                           "(the CLI command sets it)")
    engine: str = setting("select", _choice("select", "thread", "fork"),
                          "concurrency model: one event loop, a thread or a process per client")
    proto: str = setting("tcp", _choice("tcp", "udp"), "transport")
    host: str = setting("127.0.0.1", _named(_text, "HOST"),
                        "address to bind (IPv4 or IPv6, e.g. ::1)")
    port: int = setting(None, _optional(_integer(0, 65535)),
                        "port to bind, 0 for any (default 7007 for echo, 7070 for push)")
    unix: str = setting(None, _optional(_unix_path),
                        "serve on a Unix socket at this path instead of host and port "
                        "(stream; datagram with proto udp)")
    unix_mode: str = setting(None, _optional(_octal_mode),
                             "with unix: the socket file's permissions in octal, e.g. 660 "
                             "(default: from the umask)")
    backlog: int = setting(1024, _integer(1, 1 << 20), "TCP listen backlog")
    tls_cert: str = setting(None, _optional(_named(_text, "FILE")),
                            "serve TLS (TCP only) with this PEM certificate chain")
    tls_key: str = setting(None, _optional(_named(_text, "FILE")),
                           "the PEM private key of tls_cert (default: in the tls_cert file)")
    tls_ca: str = setting(None, _optional(_named(_text, "FILE")),
                          "require client certificates signed by these PEM CA certificates "
                          "(a file, or a hashed directory)")
    tls_handshake_timeout: float = setting(10.0, _seconds,
                                           "close a TLS client whose handshake is not done "
                                           "in this time, 0 = never", live=True)
    workers: int = setting(1, _integer(1, 64),
                           "pre-forked worker processes under one supervisor (select, thread)",
                           live=True)
    reuse_port: bool = setting(False, _boolean,
                               "with workers: each binds its own SO_REUSEPORT socket")
    max_connections: int = setting(
        None, _optional(_integer(1, 1 << 24)),
        "most connections (TCP) or peers (UDP) served at once "
        "(default: select: RLIMIT_NOFILE less 100, thread 1000, fork 256)",
        live=True)
    idle_timeout: float = setting(0.0, _seconds, "close a connection silent this long, 0 = never",
                                  live=True)
    udp_idle: float = setting(60.0, _seconds, "forget a UDP peer silent this long", live=True)
    max_line: int = setting(65536, _integer(1, 1 << 30), "longest line a line protocol accepts",
                            live=True)
    max_buffer: int = setting(262144, _integer(1024, 1 << 31),
                              "most unsent output per connection before reading pauses", live=True)
    slow_consumer: str = setting("disconnect", _choice("disconnect", "drop"),
                                 "push: a subscriber whose unsent output would exceed max_buffer "
                                 "is closed (disconnect) or misses the message (drop)", live=True)
    tick: float = setting(0.0, _seconds, "push: publish 'MSG time <ISO-8601 UTC>' to channel "
                          "time every this many seconds, 0 = never")
    bus: str = setting(None, _optional(_bus_url),
                       "push: reach the subscribers of every node on this Redis, "
                       "redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss:// (TLS)")
    bus_password: str = setting(None, _optional(_named(_text, "PASSWORD")),
                                "push: the Redis password for bus (wins over one in the URL)")
    shutdown_timeout: float = setting(10.0, _seconds,
                                      "how long a stop or close waits for output to drain",
                                      live=True)
    log_level: str = setting("info", _choice("debug", "info", "warning", "error"),
                             "logging threshold", live=True)
    access_log: bool = setting(False, _boolean, "log one line per connection", live=True)
    allow: tuple[str, ...] = setting((), parse_networks,
                                     "only peers in these CIDR networks may connect (TCP) or "
                                     "send (UDP); empty allows all", live=True)
    deny: tuple[str, ...] = setting((), parse_networks,
                                    "peers in these CIDR networks are refused; wins over allow",
                                    live=True)
    max_connections_per_ip: int = setting(0, _integer(0, 1 << 24),
                                          "most TCP connections one IP address may hold at "
                                          "once (per process), 0 = unlimited", live=True)
    proxy_protocol: bool = setting(False, _boolean,
                                   "every TCP connection starts with a PROXY protocol header "
                                   "(v1 or v2) from a load balancer naming the client")
    proxy_allow: tuple[str, ...] = setting((), parse_networks,
                                           "with proxy_protocol: the load balancers (CIDR "
                                           "networks) that may connect and send the header",
                                           live=True)
    user: str = setting(None, _optional(_named(_account("user"), "USER")),
                        "after binding, run as this user (name or uid; needs root)")
    group: str = setting(None, _optional(_named(_account("group"), "GROUP")),
                         "after binding, run as this group (default: the user's own)")
    pidfile: str = setting(None, _optional(_named(_text, "FILE")),
                           "write the server's pid to this file; removed on exit")
    allow_root: bool = setting(None, _optional(_boolean),
                               "run handlers as root when user is unset: true allows, false "
                               "refuses to start (default: allowed, with a warning)")
    config: str = setting(None, _optional(_named(_text, "FILE")),
                          "TOML file to read settings from")

    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in _fields():
            value = getattr(self, f.name)
            try:
                value = f.metadata["parse"](value)
            except ValueError as exc:
                raise ConfigError(f"{f.name}: {exc}{_origin(self.sources, f.name)}") from None
            object.__setattr__(self, f.name, value)
        if self.port is None:
            object.__setattr__(self, "port", DEFAULT_PORTS.get(self.service, DEFAULT_PORTS["echo"]))
        if self.max_connections is None:
            limit = DEFAULT_MAX_CONNECTIONS[self.engine] or descriptor_limit()
            object.__setattr__(self, "max_connections", limit)
        self._check_transport()
        if self.engine == "fork" and self.workers > 1:
            raise ConfigError(f"workers: {self.workers} workers do not go with engine fork, "
                              f"which forks per connection{_origin(self.sources, 'workers')}")

    def _check_transport(self) -> None:
        """The combinations of unix, reuse_port and the TLS settings that cannot work."""
        for name in ("tls_key", "tls_ca"):
            if getattr(self, name) and not self.tls_cert:
                raise ConfigError(f"{name}: needs tls_cert (the server's certificate)"
                                  f"{_origin(self.sources, name)}")
        if self.tls_cert and self.proto != "tcp":
            raise ConfigError(f"tls_cert: TLS needs proto tcp, not {self.proto} (DTLS is not "
                              f"supported){_origin(self.sources, 'tls_cert')}")
        if self.unix_mode and not self.unix:
            raise ConfigError("unix_mode: needs unix (a socket path)"
                              + _origin(self.sources, "unix_mode"))
        if self.unix and self.reuse_port:
            raise ConfigError(f"reuse_port: does not go with unix (SO_REUSEPORT is for IP "
                              f"ports){_origin(self.sources, 'reuse_port')}")
        self._check_proxy()

    def _check_proxy(self) -> None:
        """proxy_protocol is for TCP, and needs the load balancers named (but on a Unix
        socket, whose peers have no address, the socket file's permissions decide)."""
        where = _origin(self.sources, "proxy_protocol")
        if not self.proxy_protocol:
            if self.proxy_allow:
                raise ConfigError("proxy_allow: needs proxy_protocol = true"
                                  + _origin(self.sources, "proxy_allow"))
        elif self.proto != "tcp":
            raise ConfigError(f"proxy_protocol: needs proto tcp, not {self.proto} (the PROXY "
                              f"protocol over UDP is not supported){where}")
        elif self.unix and self.proxy_allow:
            raise ConfigError(f"proxy_allow: does not apply to unix (a Unix socket's peers have "
                              f"no address: the socket file's permissions, unix_mode, decide "
                              f"who connects){_origin(self.sources, 'proxy_allow')}")
        elif not self.unix and not self.proxy_allow:
            raise ConfigError(f"proxy_allow: name your load balancers (CIDR networks, e.g. "
                              f"10.0.0.5/32): with proxy_protocol on{where}, only they may "
                              f"connect")

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed (and validated)."""
        return dataclasses.replace(self, **changes)


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if "parse" in f.metadata]


SETTINGS: dict[str, dataclasses.Field] = {f.name: f for f in _fields()}


def _origin(sources: Mapping[str, str], name: str) -> str:
    return f" (from {sources[name]})" if name in sources else ""


def _unknown(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, SETTINGS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown setting '{name}' in {where}{hint}")


def read_file(path: str) -> dict[str, Any]:
    """Read a TOML config file; every key must be a known setting."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    for key in data:
        if key not in SETTINGS:
            raise _unknown(key, path)
        if key == "config":
            raise ConfigError(f"config: a config file cannot name another one (in {path})")
    return data


def read_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The SOCKSERV_* variables; every one must name a known setting."""
    found = {}
    for var, value in environ.items():
        if var.startswith(ENV_PREFIX):
            key = var[len(ENV_PREFIX):].lower()
            if key not in SETTINGS:
                raise _unknown(key, f"environment variable {var}")
            found[key] = value
    return found


def load_config(flags: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None, *, service: str | None = None) -> Config:
    """Merge defaults < file < env < flags into a validated :class:`Config`.

    ``flags`` maps setting names to raw values (strings, or bools for switches);
    the file is ``flags['config']``, else ``SOCKSERV_CONFIG``. ``service`` is what
    the CLI command names (``echo``, ``serve MODULE:CLASS``): it beats every source.
    """
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    env = read_env(environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = flags.get("config") or env.get("config")
    if path:
        for key, value in read_file(path).items():
            values[key], sources[key] = value, path
    for key, value in env.items():
        values[key], sources[key] = value, ENV_PREFIX + key.upper()
    for key, value in flags.items():
        values[key], sources[key] = value, "--" + key.replace("_", "-")
    if service is not None:
        values["service"], sources["service"] = service, "command line"
    return Config(**values, sources=sources)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if value is None:
        return '""'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def _redacted(name: str, value: Any) -> Any:
    """A secret as ``--print-config`` shows it: a password setting, or the password in a
    URL (``redis://:secret@host`` -> ``redis://:***@host``), replaced by ``***``."""
    if not isinstance(value, str) or not value:
        return value
    if name.endswith("password"):
        return "***"
    scheme, sep, rest = value.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
    return value


def to_toml(config: Config) -> str:
    """The effective config as TOML, each line commented with where its value came from."""
    lines = []
    for name in SETTINGS:
        value = getattr(config, name)
        origin = config.sources.get(name, "default")
        line = f"{name} = {_toml_value(_redacted(name, value))}  # {origin}"
        if name == "config":  # a file cannot name a file: shown for information only
            if value is None:
                continue
            line = "# " + line
        lines.append(line)
    return "\n".join(lines) + "\n"
