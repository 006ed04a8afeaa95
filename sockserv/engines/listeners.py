"""Making listening sockets from a Config (for supervisors and SO_REUSEPORT workers),
and binding Unix sockets: a stale socket file is replaced, a live one never."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from ..config import Config

__all__ = ["UnixPath", "bind_listener", "bind_unix", "prepare_unix_path"]

log = logging.getLogger("sockserv")


def prepare_unix_path(path: str, kind: int) -> None:
    """Make way for binding a Unix socket of type ``kind`` at ``path``.

    Nothing there: nothing to do. A socket file nobody is bound to any more (its
    server died: connecting is refused) is removed. A socket some process still
    serves (connecting works, would block, or finds the other socket type), or a
    file that is not a socket, raises ``OSError`` (EADDRINUSE, EEXIST) and is left
    alone. (Two servers starting at the same instant on one stale path can still
    race: the later bind wins.)
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket (left alone)")
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except ConnectionRefusedError:  # stale: left by a server that is gone
        os.unlink(path)
        log.info("unix: removed the stale socket file %s", path)
        return
    except BlockingIOError:  # a listener with a full backlog: alive
        pass
    except OSError as exc:
        if exc.errno != errno.EPROTOTYPE:  # EPROTOTYPE: alive, of the other socket type
            raise OSError(exc.errno, f"cannot tell whether the socket there is in use: "
                                     f"{exc.strerror or exc}") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening on it (its socket is left "
                                    "alone)")


class UnixPath:
    """A socket file this process created: :meth:`remove` unlinks it, unless it is gone
    or is not that file any more (another server has replaced it since: a new file may
    reuse the inode number, not its change time too)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.ident = self._identity()

    def _identity(self) -> tuple[int, int, int]:
        st = os.lstat(self.path)
        return st.st_dev, st.st_ino, st.st_ctime_ns

    def remove(self) -> None:
        try:
            if self._identity() == self.ident:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # e.g. privileges dropped, and the directory is not ours
            log.warning("cannot remove the socket file %s: %s", self.path, exc.strerror or exc)


def bind_unix(sock: socket.socket, path: str, mode: str | None = None) -> UnixPath:
    """Bind the AF_UNIX ``sock`` at ``path`` (see :func:`prepare_unix_path`), then
    ``chmod`` it to ``mode`` (octal digits, e.g. ``"660"``) if given."""
    prepare_unix_path(path, sock.type)
    sock.bind(path)
    if mode:
        try:
            os.chmod(path, int(mode, 8))
        except OSError:
            os.unlink(path)
            raise
    return UnixPath(path)  # after chmod, which changes the file's ctime


def bind_listener(config: Config, reuse_port: bool = False) -> socket.socket:
    """A socket bound at ``config.host``:``config.port``, or at ``config.unix``
    (listening, for TCP). The caller removes a Unix socket's file (:class:`UnixPath`)."""
    kind = socket.SOCK_STREAM if config.proto == "tcp" else socket.SOCK_DGRAM
    if config.unix:
        sock = socket.socket(socket.AF_UNIX, kind)
        owned = None
        try:
            owned = bind_unix(sock, config.unix, config.unix_mode)
            if kind == socket.SOCK_STREAM:
                sock.listen(config.backlog)
        except BaseException:
            sock.close()
            if owned is not None:
                owned.remove()
            raise
        return sock
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((config.host, config.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return sock
