"""Running as root outside systemd: the ``user``, ``group`` and ``allow_root``
settings, and the ``pidfile``.

The order :func:`sockserv.cli.run` follows: :func:`plan` before binding (bad
names and a refused root are configuration errors, exit 2), bind, write the
pidfile (as root, so it can live in ``/run``), :func:`drop` before the serve
loop starts (so no handler, thread or forked child ever runs with the old
identity), and :meth:`PidFile.remove` on the way out.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import tempfile

from .config import Config, ConfigError

__all__ = ["Identity", "PidFile", "SetupError", "drop", "plan"]

log = logging.getLogger("sockserv")


class SetupError(Exception):
    """The process cannot be set up as configured (a runtime failure: exit 1)."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Whom to become after binding: None leaves that id as it is."""

    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None


def _origin(config: Config, name: str) -> str:
    return f" (from {config.sources[name]})" if name in config.sources else ""


def plan(config: Config) -> Identity:
    """Resolve ``user`` and ``group`` and apply the ``allow_root`` rule, before binding.

    - ``user`` sets the uid, and the gid to the user's primary group unless
      ``group`` names another one.
    - Switching to another identity needs root: otherwise :class:`SetupError`.
    - ``allow_root = false`` with the handlers left running as root (no ``user``,
      or ``user = "root"``) raises :class:`ConfigError`. Unset (the default), it
      is allowed and :func:`drop` logs a warning; ``true`` allows it quietly.
    """
    uid = gid = None
    user = group = None
    if config.user:
        entry = (pwd.getpwuid(int(config.user)) if config.user.isdigit()
                 else pwd.getpwnam(config.user))
        uid, gid, user = entry.pw_uid, entry.pw_gid, entry.pw_name
        group = _group_name(gid)
    if config.group:
        entry_g = (grp.getgrgid(int(config.group)) if config.group.isdigit()
                   else grp.getgrnam(config.group))
        gid, group = entry_g.gr_gid, entry_g.gr_name
    euid, egid = os.geteuid(), os.getegid()
    if euid != 0:
        if uid is not None and uid != euid:
            raise SetupError(f"user: switching to {user} needs root (running as uid {euid})"
                             f"{_origin(config, 'user')}")
        if gid is not None and gid != egid:
            raise SetupError(f"group: switching to {group} needs root (running as gid {egid})"
                             f"{_origin(config, 'group')}")
    if euid == 0 and (uid is None or uid == 0) and config.allow_root is False:
        origin = _origin(config, "allow_root").replace("--allow-root", "--no-allow-root")
        raise ConfigError("allow_root: false" + origin +
                          " refuses to run handlers as root; set user (e.g. user = \"nobody\")"
                          " or allow_root = true")
    return Identity(uid, gid, user, group)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def drop(identity: Identity, config: Config) -> None:
    """Become ``identity``: as root, clear the supplementary groups, then set the
    real, effective and saved gid, then uid. Checked afterwards: root cannot be
    regained. Raises :class:`SetupError` on failure."""
    try:
        if os.geteuid() == 0 and (identity.uid is not None or identity.gid is not None):
            os.setgroups([])
        if identity.gid is not None and os.getresgid() != (identity.gid,) * 3:
            os.setresgid(identity.gid, identity.gid, identity.gid)
        if identity.uid is not None and os.getresuid() != (identity.uid,) * 3:
            os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as exc:
        raise SetupError(f"cannot switch to user {identity.user or '-'}, group "
                         f"{identity.group or '-'}: {exc.strerror or exc}") from None
    if identity.uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover -- the kernel let us back: never serve like this
            raise SetupError("privileges were not dropped: setuid(0) still works")
    if identity.uid is not None or identity.gid is not None:
        log.info("running as user %s (uid %d), group %s (gid %d)",
                 pwd.getpwuid(os.getuid()).pw_name, os.getuid(), _group_name(os.getgid()),
                 os.getgid())
    if os.geteuid() == 0 and config.allow_root is None:
        log.warning("running handlers as root: set user (e.g. --user nobody) to drop "
                    "privileges, or allow_root = true to silence this")


class PidFile:
    """The ``pidfile`` setting: this process's pid, written atomically (a temporary file
    in the same directory, renamed over the path) and removed on exit if it still
    holds our pid. A pidfile naming another live ``sockserv`` process is refused; a
    stale one is replaced."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.written = False

    def read(self) -> int | None:
        """The pid in the file, or None (missing, unreadable, not a number)."""
        try:
            with open(self.path) as f:
                text = f.read(32).strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def write(self) -> None:
        """Write our pid; :class:`SetupError` if another sockserv holds the file."""
        other = self.read()
        if other is not None and other != os.getpid() and _is_sockserv(other):
            raise SetupError(f"pidfile: {self.path} names pid {other}, a running sockserv")
        directory, name = os.path.split(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
                    os.fchmod(f.fileno(), 0o644)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            raise SetupError(f"pidfile: cannot write {self.path}: {exc.strerror or exc}") \
                from None
        self.written = True

    def remove(self) -> None:
        """Remove the file if it still holds our pid (a warning if that fails, e.g.
        after dropping privileges in a directory the new user cannot write)."""
        if not self.written or self.read() != os.getpid():
            return
        try:
            os.unlink(self.path)
        except OSError as exc:
            log.warning("pidfile: cannot remove %s: %s", self.path, exc.strerror or exc)
        self.written = False


def _is_sockserv(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sockserv" in f.read()
    except OSError:
        return True  # alive, and we cannot tell what it is: do not take its file
