"""TLS on the standard ``ssl`` module: the server context a Config describes, and the
sans-IO TLS state of one connection.

:func:`server_context` builds (once per process for given paths) the context of
``tls_cert``, ``tls_key`` and ``tls_ca``: TLS 1.2 or later, no renegotiation,
client certificates required and verified when ``tls_ca`` is set. A file that
cannot be read or does not hold what it should is a :class:`ConfigError`
naming the setting, raised before anything is bound.

:class:`TLSSession` is one server-side connection as an ``ssl.SSLObject`` over
two ``ssl.MemoryBIO``: the engines keep moving raw bytes on the socket exactly
as they do without TLS, feed what they receive in, and send what comes out.
Nothing here touches a socket.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

from .config import Config, ConfigError
from .connection import format_address
from .log import RateLimitedLog

__all__ = ["MINIMUM_VERSION", "TLSSession", "build_context", "server_context"]

log = logging.getLogger("sockserv")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
READ_SIZE = 65536


class _Encrypted(Exception):
    """The key file wants a passphrase (raised by the password callback)."""


def _refuse_passphrase() -> bytes:
    raise _Encrypted()


def _check_readable(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        if setting == "tls_ca":
            return b""
        raise ConfigError(f"{setting}: {path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def build_context(config: Config) -> ssl.SSLContext:
    """A new server context from ``config``'s TLS settings (``tls_cert`` must be set).

    Raises :class:`ConfigError` with one line naming the setting at fault."""
    cert, key, ca = config.tls_cert, config.tls_key, config.tls_ca
    cert_pem = _check_readable("tls_cert", cert)
    key_pem = _check_readable("tls_key", key) if key else cert_pem
    key_setting = "tls_key" if key else "tls_cert"
    key_path = key or cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # The raw stream ending without close_notify ends the input like a close_notify,
    # instead of an alert that would also cut the output (OpenSSL 3).
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _Encrypted:
        raise ConfigError(f"{key_setting}: the private key in {key_path} is encrypted; "
                          "give an unencrypted key (passphrases are not supported)") from None
    except ssl.SSLError as exc:
        if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
            raise ConfigError(f"tls_cert: {cert} holds no PEM certificate") from None
        if b"PRIVATE KEY-----" not in key_pem:
            raise ConfigError(f"{key_setting}: {key_path} holds no PEM private key") from None
        raise ConfigError(f"{key_setting}: the private key in {key_path} does not go with the "
                          f"certificate in {cert} ({exc.reason or exc})") from None
    except OSError as exc:  # vanished between the two reads
        raise ConfigError(f"tls_cert: cannot load {cert}: {exc.strerror or exc}") from None
    if ca:
        _check_readable("tls_ca", ca)
        try:
            if os.path.isdir(ca):
                context.load_verify_locations(capath=ca)
            else:
                context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise ConfigError(f"tls_ca: {ca} holds no usable CA certificate ({reason})") from None
        if os.path.isfile(ca) and not context.get_ca_certs():
            raise ConfigError(f"tls_ca: {ca} holds no CA certificate")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


_contexts: dict[tuple[str, str | None, str | None], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def server_context(config: Config) -> ssl.SSLContext | None:
    """The server context for ``config``, or None without ``tls_cert``.

    Built once per process for the same three paths, so that a process that reads
    the files before dropping privileges (the CLI, a supervisor) hands the context to
    the workers and children it forks; they do not read the files again. A changed
    certificate is read at the next start."""
    if not config.tls_cert:
        return None
    key = (config.tls_cert, config.tls_key, config.tls_ca)
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            context = _contexts[key] = build_context(config)
        return context


#: failed handshakes, logged at most once a second per process (scanners and floods
#: would fill the log otherwise)
failure_log = RateLimitedLog(log)


def handshake_failed(peer: Any, exc: BaseException, session: TLSSession | None = None) -> None:
    """Log (rate-limited) that the handshake with ``peer`` failed and why. A client that
    closed without sending a byte (a port probe, a TCP health check) is only a debug line."""
    if session is not None and not session.received and \
            isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError | ConnectionError):
        log.debug("tls: %s closed before the handshake", format_address(peer))
        return
    failure_log.log(logging.INFO, "tls: handshake with %s failed: %s", format_address(peer),
                    describe_error(exc))


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed handshake (``alert certificate required``)."""
    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError):
        return "the client closed the connection mid-handshake"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class TLSSession:
    """The server side of one TLS connection, without I/O (sans-IO).

    The engine calls :meth:`feed` with the bytes it received (:meth:`feed_eof` at
    the end of the raw stream), :meth:`handshake` until it returns True, then
    :meth:`read` for plaintext; :meth:`encrypt` turns the handler's bytes into
    records, :meth:`close_notify` ends the connection. After each call, what
    :meth:`data_to_send` returns goes to the socket, in order. ``ssl.SSLError``
    from any of them means the peer broke the protocol. Not thread-safe: a caller
    with several threads serialises the calls (the blocking engines hold a lock).
    """

    __slots__ = ("incoming", "outgoing", "obj", "established", "closed", "received",
                 "_notified")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False  #: the handshake is complete
        self.closed = False  #: the peer's input is over (close_notify, or raw EOF)
        self.received = 0  #: raw bytes fed so far
        self._notified = False

    def feed(self, data: bytes) -> None:
        """Bytes received from the peer."""
        self.received += len(data)
        self.incoming.write(data)

    def feed_eof(self) -> None:
        """The peer's raw stream ended."""
        self.incoming.write_eof()

    def handshake(self) -> bool:
        """Advance the handshake with what was fed; True once it is complete."""
        if not self.established:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.established = True
        return True

    def read(self) -> tuple[bytes, bool]:
        """``(plaintext, ended)``: the application data decrypted from what was fed so
        far, and whether the peer's input is over (a close_notify, or the raw stream
        ended without one: a truncation the handler cannot tell from a clean end)."""
        if self.closed:
            return b"", True
        chunks = []
        try:
            while True:
                chunk = self.obj.read(READ_SIZE)
                if not chunk:  # close_notify
                    self.closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.closed = True
        return b"".join(chunks), self.closed

    def encrypt(self, data: bytes) -> bytes:
        """The records that carry ``data`` (plus anything else due), to send in order."""
        self.obj.write(data)
        return self.outgoing.read()

    def data_to_send(self) -> bytes:
        """What the TLS layer wants sent (handshake flights, tickets, alerts)."""
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        """The close_notify alert to send (once; empty when already sent, or when the
        handshake never completed)."""
        if self._notified or not self.established:
            return b""
        self._notified = True
        # unwrap() sends close_notify, then reads on to find the peer's: keep what the
        # peer sent meanwhile out of its way, or it would fail on application data.
        unread = b"" if self.incoming.eof else self.incoming.read()
        try:
            self.obj.unwrap()
        except ssl.SSLError:  # SSLWantReadError: the peer's own close_notify is not needed
            pass
        if unread:
            self.incoming.write(unread)
        return self.outgoing.read()

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        """The verified client certificate (``getpeercert()``), None without one."""
        if not self.established:
            return None
        return self.obj.getpeercert() or None
