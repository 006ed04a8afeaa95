"""TLS on every engine, with real clients: Python's ssl (through memory BIOs, so one
thread sends while another receives and the client can half-close), `openssl s_client`,
a TLS 1.1-only client, clients without (or with the wrong) certificate, clients that
stall mid-handshake. The certificates are made per session with the openssl CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import sockserv
from sockserv import EchoHandler, Handler
from sockserv.config import Config, ConfigError
from sockserv.tls import TLSSession, build_context

from .conftest import (
    ENGINE_NAMES,
    ROOT,
    connect,
    free_port,
    hangup,
    recv_exactly,
    recv_until_eof,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")

EXTENSIONS = """\
[server]
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
extendedKeyUsage = serverAuth
[client]
extendedKeyUsage = clientAuth
"""


@dataclasses.dataclass
class PKI:
    """Throwaway certificates: a CA, a server and a client signed by it, and a client
    signed by another CA."""

    dir: Path
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str
    rogue_key: str
    encrypted_key: str
    combined: str  # the server's certificate and key in one file

    def settings(self, **more):
        return {"tls_cert": self.server_cert, "tls_key": self.server_key, **more}

    def flags(self, *more):
        return ["--tls-cert", self.server_cert, "--tls-key", self.server_key, *more]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(cwd, name, subject, ca, extensions):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
             cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", "ext.cnf",
             "-extensions", extensions, cwd=cwd)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    (d / "ext.cnf").write_text(EXTENSIONS)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=sockserv test {ca}", cwd=d)
    _issue(d, "server", "/CN=localhost", "ca", "server")
    _issue(d, "client", "/CN=alice", "ca", "client")
    _issue(d, "rogue", "/CN=mallory", "rogue-ca", "client")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-aes256", "-pass", "pass:secret", "-out", "encrypted.key", cwd=d)
    (d / "combined.pem").write_bytes((d / "server.pem").read_bytes() +
                                     (d / "server.key").read_bytes())
    return PKI(d, str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"),
               str(d / "client.pem"), str(d / "client.key"), str(d / "rogue.pem"),
               str(d / "rogue.key"), str(d / "encrypted.key"), str(d / "combined.pem"))


class TLSClient:
    """A TLS client on a raw socket through an ``ssl.SSLObject`` over memory BIOs: one
    thread may send while another receives, and ``half_close()`` sends close_notify and
    shuts the socket's sending side while reading goes on. ``clean_end`` tells whether
    the server ended with a close_notify."""

    def __init__(self, address, pki, *, cert=None, family=socket.AF_INET, timeout=10.0):
        context = ssl.create_default_context(cafile=pki.ca)
        if cert is not None:
            context.load_cert_chain(*cert)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.lock = threading.Lock()  # the SSLObject
        self.send_lock = threading.Lock()  # records leave in the order they were made
        self.clean_end = False
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self._feed()
        self._send_pending()

    def _send_pending(self):
        with self.send_lock:
            with self.lock:
                data = self.outgoing.read()
            if data:
                self.sock.sendall(data)

    def _feed(self):
        raw = self.sock.recv(65536)
        with self.lock:
            if raw:
                self.incoming.write(raw)
            else:
                self.incoming.write_eof()

    def sendall(self, data):
        view = memoryview(data)
        for start in range(0, len(view), 65536):
            with self.send_lock:
                with self.lock:
                    self.obj.write(view[start:start + 65536])
                    records = self.outgoing.read()
                self.sock.sendall(records)

    def recv(self, size=65536):
        """At most ``size`` bytes of plaintext, or b"" at the end (``clean_end`` says how
        it ended): a socket's ``recv``, for conftest's recv_exactly and recv_until_eof."""
        while True:
            with self.lock:
                try:
                    data = self.obj.read(size)
                    self.clean_end = not data  # b"": the server's close_notify
                    return data
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    self.clean_end = True
                    return b""
                except ssl.SSLEOFError:
                    return b""
            self._feed()

    def half_close(self):
        with self.send_lock:
            with self.lock:
                unread = self.incoming.read()  # unwrap() would read on, and fail on data
                try:
                    self.obj.unwrap()
                except ssl.SSLWantReadError:
                    pass
                self.incoming.write(unread)
                alert = self.outgoing.read()
            self.sock.sendall(alert)
            self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        hangup(self.sock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tls_serve(serve, pki, engine, handler=EchoHandler, **settings):
    return serve(engine, handler, **pki.settings(**settings))


def client_hello():
    """The first flight of a real TLS client: a ClientHello."""
    obj = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


class WhoAreYou(Handler):
    """Answers the common name of the client's certificate (or 'nobody')."""

    made = []

    def connection_made(self):
        WhoAreYou.made.append(self.conn.peer)
        cert = self.conn.peer_cert
        if cert is None:
            self.conn.write(b"nobody\n")
        else:
            subject = dict(item for rdn in cert["subject"] for item in rdn)
            self.conn.write(subject["commonName"].encode() + b"\n")
        self.conn.close()


# -- echo on every engine -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_one_mebibyte_of_random_bytes_echoes_over_tls(serve, cli, pki, engine):
    if engine == "fork":
        # A server of its own, as the fork engine runs: forking the test process, with
        # the threads earlier tests leave behind, stalled this handshake now and then in
        # long runs (under investigation; see the issue note).
        process = cli("echo", "--port", "0", "--engine", "fork", *pki.flags())
        address = ("127.0.0.1", process.wait_serving())
    else:
        address = tls_serve(serve, pki, engine).server_address
    data = os.urandom(1 << 20)
    with TLSClient(address, pki) as client:
        sender = threading.Thread(target=client.sendall, args=(data,))
        sender.start()
        assert recv_exactly(client, len(data)) == data
        sender.join(10)
        client.half_close()
        assert recv_until_eof(client) == b""
        assert client.clean_end, "the server ended without close_notify"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_half_close_over_tls_gets_every_byte_back_then_close_notify(serve, pki, engine):
    server = tls_serve(serve, pki, engine)
    data = os.urandom(300_000)
    with TLSClient(server.server_address, pki) as client:
        def send_then_half_close():
            client.sendall(data)
            client.half_close()

        sender = threading.Thread(target=send_then_half_close)
        sender.start()
        assert recv_until_eof(client) == data
        assert client.clean_end
        sender.join(10)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_raw_eof_without_close_notify_is_end_of_input_too(serve, pki, engine):
    server = tls_serve(serve, pki, engine)
    with TLSClient(server.server_address, pki) as client:
        client.sendall(b"truncated\n")
        assert recv_exactly(client, 10) == b"truncated\n"
        client.sock.shutdown(socket.SHUT_WR)  # no close_notify first
        assert recv_until_eof(client) == b""


def _read_until(stream, needle, timeout=10.0):
    """Read from a subprocess pipe until ``needle`` arrived; bounded."""
    got = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while needle not in got:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no {needle!r} in {timeout}s; got {got!r}")
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"output ended before {needle!r}; got {got!r}")
            got += chunk
    return got


@contextlib.contextmanager
def running(*command):
    """A subprocess with pipes, killed (if still running) and reaped at the end."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def s_client(port, pki, *extra):
    return running("openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
                   "localhost", "-CAfile", pki.ca, "-verify_return_error", "-verify_hostname",
                   "localhost", "-quiet", "-no_ign_eof", *extra)


# s_client talks to a server in a process of its own: a fork-engine server inside the
# test process would fork children holding copies of s_client's stdin pipe.


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_openssl_s_client_verifies_the_server_and_gets_its_echo(cli, pki, engine):
    server = cli("echo", "--port", "0", "--engine", engine, *pki.flags())
    with s_client(server.wait_serving(), pki) as proc:
        proc.stdin.write(b"hello from s_client\n")
        proc.stdin.flush()
        assert b"hello from s_client\n" in _read_until(proc.stdout, b"\n")
        proc.stdin.close()  # s_client sends close_notify and exits
        assert proc.wait(10) == 0, proc.stderr.read()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_openssl_s_client_with_a_client_certificate(cli, pki, engine):
    server = cli("serve", "tests.test_tls:WhoAreYou", "--port", "0", "--engine", engine,
                 *pki.flags("--tls-ca", pki.ca))
    with s_client(server.wait_serving(), pki, "-cert", pki.client_cert,
                  "-key", pki.client_key) as proc:
        assert b"alice\n" in _read_until(proc.stdout, b"\n")
        proc.stdin.close()
        assert proc.wait(10) == 0


# -- client certificates --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_client_certificate_required_and_verified_with_tls_ca(serve, pki, engine):
    server = tls_serve(serve, pki, engine, WhoAreYou, tls_ca=pki.ca)
    with TLSClient(server.server_address, pki,
                   cert=(pki.client_cert, pki.client_key)) as client:
        assert recv_until_eof(client) == b"alice\n"
    for cert in (None, (pki.rogue_cert, pki.rogue_key)):
        # TLS 1.3: the client finishes its side before the server checks its certificate,
        # so the refusal is an alert (or the end) in place of the first answer.
        try:
            with TLSClient(server.server_address, pki, cert=cert) as client:
                answer = recv_until_eof(client)
        except (ssl.SSLError, ConnectionError) as exc:
            answer = exc
        assert not isinstance(answer, bytes) or answer == b"", (cert, answer)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_without_tls_ca_no_certificate_is_asked_for(serve, pki, engine):
    server = tls_serve(serve, pki, engine, WhoAreYou)
    with TLSClient(server.server_address, pki,
                   cert=(pki.client_cert, pki.client_key)) as client:
        assert recv_until_eof(client) == b"nobody\n"


def test_the_handler_sees_nothing_of_a_refused_client(serve, pki):
    WhoAreYou.made.clear()
    server = tls_serve(serve, pki, "select", WhoAreYou, tls_ca=pki.ca)
    try:
        with TLSClient(server.server_address, pki) as client:
            recv_until_eof(client)
    except (ssl.SSLError, ConnectionError):
        pass
    with TLSClient(server.server_address, pki,
                   cert=(pki.client_cert, pki.client_key)) as client:
        assert recv_until_eof(client) == b"alice\n"
    assert len(WhoAreYou.made) == 1


# -- protocol versions --------------------------------------------------------------------


def tls11_only_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # this OpenSSL would refuse TLS 1.1 itself
    return context


def permissive_server(pki):
    """A plain ssl server that still speaks TLS 1.1: proof that the client can."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    versions = []

    def serve_one():
        sock, _ = listener.accept()
        sock.settimeout(10)
        try:
            with context.wrap_socket(sock, server_side=True) as tls:
                versions.append(tls.version())
        except (ssl.SSLError, OSError) as exc:
            versions.append(exc)
        finally:
            listener.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    return listener.getsockname(), thread, versions


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_tls_1_1_only_client_is_refused(serve, pki, engine):
    address, thread, versions = permissive_server(pki)
    try:
        with socket.create_connection(address, timeout=10) as raw, \
                tls11_only_context().wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.1"
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {exc}")
    finally:
        thread.join(10)
    assert versions == ["TLSv1.1"]
    server = tls_serve(serve, pki, engine)
    with socket.create_connection(server.server_address, timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            tls11_only_context().wrap_socket(raw)


# -- handshakes that do not finish ---------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_clients_stalled_mid_handshake_do_not_stall_anyone_else(serve, pki, engine):
    server = tls_serve(serve, pki, engine, tls_handshake_timeout=60)
    port = server.server_address[1]
    hello = client_hello()
    stalled = [connect(port) for _ in range(20)]
    try:
        for i, sock in enumerate(stalled):
            if i % 2:
                sock.sendall(hello[:len(hello) // 2])  # half a ClientHello, then silence
        for _ in range(3):  # while they stall, others complete TLS echoes
            with TLSClient(server.server_address, pki, timeout=10) as client:
                client.sendall(b"not stalled\n")
                assert recv_exactly(client, 12) == b"not stalled\n"
        for sock in stalled:  # and the stalled ones are still waiting, unanswered
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in stalled:
            hangup(sock)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_handshake_that_does_not_finish_in_time_is_closed(serve, pki, engine):
    WhoAreYou.made.clear()
    server = tls_serve(serve, pki, engine, WhoAreYou, tls_handshake_timeout=0.3)
    port = server.server_address[1]
    hello = client_hello()
    with connect(port) as silent, connect(port) as half:
        half.sendall(hello[:20])
        for sock in (silent, half):
            sock.settimeout(10)
            try:
                assert sock.recv(65536) == b""  # closed by the server, nothing sent
            except ConnectionResetError:
                pass
    wait_for(lambda: server.live_count() == 0, what="the slots to free")
    assert WhoAreYou.made == []


# -- what the handler and the server see ---------------------------------------------------


class Collect(Handler):
    """Echoes, and records how the connection ended."""

    ended = []

    def data_received(self, data):
        self.conn.write(data)

    def connection_lost(self, exc):
        Collect.ended.append((self.conn.bytes_in, self.conn.bytes_out))


@pytest.mark.parametrize("engine", ["select", "thread"])  # fork: counted in the child
def test_bytes_in_and_out_count_the_handlers_plaintext(serve, pki, engine):
    Collect.ended.clear()
    server = tls_serve(serve, pki, engine, Collect)
    with TLSClient(server.server_address, pki) as client:
        client.sendall(b"x" * 5000)
        assert recv_exactly(client, 5000) == b"x" * 5000
        client.half_close()
        assert recv_until_eof(client) == b""
    wait_for(lambda: Collect.ended, what="connection_lost")
    assert Collect.ended == [(5000, 5000)]
    wait_for(lambda: server.stats.snapshot()["bytes_out"] == 5000, what="the stats")
    assert server.stats.snapshot()["bytes_in"] == 5000


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_stopping_the_server_ends_tls_connections_with_close_notify(serve, pki, engine):
    server = tls_serve(serve, pki, engine)
    client = TLSClient(server.server_address, pki)
    try:
        client.sendall(b"before the stop\n")
        assert recv_exactly(client, 16) == b"before the stop\n"
        server.shutdown()
        closer = threading.Thread(target=server.server_close)
        closer.start()
        assert recv_until_eof(client) == b""
        assert client.clean_end
        closer.join(10)
    finally:
        client.close()


class Chorus(Handler):
    """Four threads write 500 numbered lines each while the client is still sending;
    a fifth closes the connection once they are done. (Closed from a thread, not from
    eof_received: on the select engine a write from another thread is queued to the
    loop, and a close made on the loop itself would overtake it.)"""

    def connection_made(self):
        def sing(voice):
            for i in range(500):
                self.conn.write(b"%d:%03d\n" % (voice, i))

        voices = [threading.Thread(target=sing, args=(v,)) for v in range(4)]
        for voice in voices:
            voice.start()

        def close_when_done():
            for voice in voices:
                voice.join()
            self.conn.close()

        threading.Thread(target=close_when_done).start()

    def data_received(self, data):
        self.conn.write(b"")  # reading goes on meanwhile

    def eof_received(self):
        pass  # the closing thread closes


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_writes_from_many_threads_make_intact_records(serve, pki, engine):
    server = tls_serve(serve, pki, engine, Chorus)
    with TLSClient(server.server_address, pki) as client:
        client.sendall(os.urandom(100_000))
        client.half_close()
        lines = recv_until_eof(client).split(b"\n")
    assert lines.pop() == b""
    assert len(lines) == 2000
    for voice in range(4):  # each thread's lines arrive whole and in its order
        assert [line for line in lines if line.startswith(b"%d:" % voice)] == \
            [b"%d:%03d" % (voice, i) for i in range(500)]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_push_over_tls_delivers_across_connections(serve, pki, engine):
    """A PUB on one TLS connection is written to the subscriber's TLS connection from
    the publisher's thread (thread), through the relay (fork), or by the loop (select)."""
    server = tls_serve(serve, pki, engine, sockserv.PushHandler)
    with TLSClient(server.server_address, pki) as subscriber, \
            TLSClient(server.server_address, pki) as publisher:
        subscriber.sendall(b"SUB news\n")
        assert recv_exactly(subscriber, 4) == b"+OK\n"
        for i in range(50):
            publisher.sendall(b"PUB news %d\n" % i)
        expected = b"".join(b"MSG news %d\n" % i for i in range(50))
        assert recv_exactly(subscriber, len(expected)) == expected
        assert recv_exactly(publisher, 4 * 50) == b"+OK\n" * 50


class ClassicUpper(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


@pytest.mark.parametrize("cls", [sockserv.ThreadingTCPServer, sockserv.ForkingTCPServer,
                                 sockserv.SelectorTCPServer, sockserv.TCPServer],
                         ids=lambda c: c.__name__)
def test_a_classic_stream_handler_runs_unchanged_over_tls(serve, pki, cls):
    server = serve(cls, ClassicUpper, **pki.settings())
    with TLSClient(server.server_address, pki) as client:
        client.sendall(b"abc\ndef\n")
        assert recv_exactly(client, 8) == b"ABC\nDEF\n"
        client.half_close()
        assert recv_until_eof(client) == b""


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tls_over_a_unix_socket(serve, pki, engine):
    directory = tempfile.mkdtemp(prefix="ss-", dir="/tmp")  # short: socket paths are
    try:
        path = os.path.join(directory, "tls.sock")
        tls_serve(serve, pki, engine, unix=path)
        with TLSClient(path, pki, family=socket.AF_UNIX) as client:
            client.sendall(b"over a unix socket\n")
            assert recv_exactly(client, 19) == b"over a unix socket\n"
            client.half_close()
            assert recv_until_eof(client) == b""
            assert client.clean_end
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_tls_over_a_udp_server_class_is_refused(pki):
    with pytest.raises(ConfigError, match="tls_cert"):
        sockserv.ThreadingUDPServer(("127.0.0.1", 0), EchoHandler,
                                    config=Config(**pki.settings()))


# -- the sans-IO session ----------------------------------------------------------------------


def _pair(pki, **client_options):
    server = TLSSession(build_context(Config(**pki.settings())))
    context = ssl.create_default_context(cafile=pki.ca)
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(cin, cout, server_hostname="localhost")

    def pump():
        while True:
            to_server, to_client = cout.read(), server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                server.feed(to_server)
                server.handshake() if not server.established else None
            if to_client:
                cin.write(to_client)
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pass

    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    pump()
    return server, client, cin, cout, pump


def test_session_handshake_data_and_close_notify_in_memory(pki):
    server, client, cin, cout, pump = _pair(pki)
    assert server.established and server.peer_cert is None
    client.write(b"one")
    client.write(b"two")
    server.feed(cout.read())
    assert server.read() == (b"onetwo", False)
    cin.write(server.encrypt(b"back"))
    assert client.read(100) == b"back"
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()
    server.feed(cout.read())
    assert server.read() == (b"", True)
    assert server.read() == (b"", True)  # stays ended
    notify = server.close_notify()
    assert notify and server.close_notify() == b""  # once
    cin.write(notify)
    with pytest.raises(ssl.SSLZeroReturnError):
        client.read(100)


def test_session_split_input_any_way_gives_the_same_plaintext(pki):
    server, client, cin, cout, pump = _pair(pki)
    client.write(b"a" * 40000)
    records = cout.read()
    got = b""
    for i in range(0, len(records), 7):  # seven bytes at a time
        server.feed(records[i:i + 7])
        data, ended = server.read()
        assert not ended
        got += data
    assert got == b"a" * 40000


def test_session_raw_eof_without_close_notify_ends_input(pki):
    server, client, cin, cout, pump = _pair(pki)
    client.write(b"cut")
    server.feed(cout.read()[:-3])  # the record truncated, then the stream ends
    server.feed_eof()
    assert server.read() == (b"", True)


def test_session_garbage_instead_of_a_handshake_raises(pki):
    server = TLSSession(build_context(Config(**pki.settings())))
    server.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        server.handshake()
    assert not server.established and server.close_notify() == b""


def test_context_refuses_versions_below_1_2_and_renegotiation(pki):
    context = build_context(Config(**pki.settings(tls_ca=pki.ca)))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert build_context(Config(tls_cert=pki.combined)).verify_mode == ssl.CERT_NONE


# -- configuration errors: exit 2, one line naming the setting, before binding ---------------


def bad_tls_configs(pki):
    missing = str(pki.dir / "missing.pem")
    return {
        "missing cert": (["--tls-cert", missing], "tls_cert: cannot read"),
        "cert is a key": (["--tls-cert", pki.server_key, "--tls-key", pki.server_key],
                          "tls_cert:"),
        "missing key": (["--tls-cert", pki.server_cert, "--tls-key", missing],
                        "tls_key: cannot read"),
        "no key at all": (["--tls-cert", pki.server_cert], "tls_cert:"),
        "key is a cert": (["--tls-cert", pki.server_cert, "--tls-key", pki.ca], "tls_key:"),
        "wrong key": (["--tls-cert", pki.server_cert, "--tls-key", pki.client_key],
                      "tls_key: the private key"),
        "encrypted key": (["--tls-cert", pki.server_cert, "--tls-key", pki.encrypted_key],
                          "tls_key: the private key in .* is encrypted"),
        "bad ca": (pki.flags("--tls-ca", pki.server_key), "tls_ca:"),
        "missing ca": (pki.flags("--tls-ca", missing), "tls_ca: cannot read"),
        "key without cert": (["--tls-key", pki.server_key], "tls_key: needs tls_cert"),
        "udp": (pki.flags("--proto", "udp"), "tls_cert: TLS needs proto tcp"),
    }


@pytest.mark.parametrize("case", ["missing cert", "cert is a key", "missing key",
                                  "no key at all", "key is a cert", "wrong key",
                                  "encrypted key", "bad ca", "missing ca",
                                  "key without cert", "udp"])
def test_bad_tls_settings_exit_2_with_one_line_before_binding(pki, case):
    import re

    flags, expected = bad_tls_configs(pki)[case]
    with socket.create_server(("127.0.0.1", 0)) as taken:  # binding would fail: exit 1
        port = taken.getsockname()[1]
        result = run_cli("echo", "--port", str(port), *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert re.match(r"sockserv: error: " + expected, lines[0]), lines[0]


def test_key_in_the_certificate_file_needs_no_tls_key(pki):
    context = build_context(Config(tls_cert=pki.combined))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


# -- the command line, workers, the example -------------------------------------------------


def test_cli_serves_tls_with_workers(cli, pki):
    server = cli("echo", "--port", str(free_port()), "--workers", "2", *pki.flags())
    server.wait_line(r"supervisor \d+: 2 worker\(s\) serving")
    port = int(server.args[server.args.index("--port") + 1])
    for _ in range(4):
        with TLSClient(("127.0.0.1", port), pki) as client:
            client.sendall(b"worker\n")
            assert recv_exactly(client, 7) == b"worker\n"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_cli_logs_failed_handshakes_and_keeps_serving(cli, pki, engine):
    server = cli("echo", "--port", "0", "--engine", engine, *pki.flags())
    port = server.wait_serving()
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    server.wait_line(r"tls: handshake with 127\.0\.0\.1:\d+ failed: http request")
    with TLSClient(("127.0.0.1", port), pki) as client:
        client.sendall(b"still here\n")
        assert recv_exactly(client, 11) == b"still here\n"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tls_handshake_timeout_changes_on_sighup(cli, pki, tmp_path, engine):
    import signal

    config = tmp_path / "tls.toml"
    config.write_text("tls_handshake_timeout = 60\n")
    server = cli("echo", "--port", "0", "--engine", engine, "--config", str(config),
                 *pki.flags())
    port = server.wait_serving()
    config.write_text("tls_handshake_timeout = 0.3\n")
    server.signal(signal.SIGHUP)
    server.wait_line(r"reloaded config \(changed: tls_handshake_timeout\)")
    with connect(port) as silent:  # opened after the reload: closed after 0.3 s
        silent.settimeout(10)
        assert silent.recv(10) == b""


@pytest.mark.parametrize("client_cert", [False, True], ids=["plain", "client-certificate"])
def test_tls_echo_example(pki, client_cert):
    extra = ["--ca", pki.ca] if client_cert else []
    with running(sys.executable, str(ROOT / "examples" / "tls_echo.py"), pki.server_cert,
                 pki.server_key, "--port", "0", *extra) as proc:
        line = _read_until(proc.stdout, b"\n").decode()
        assert line.startswith("TLS echo on 127.0.0.1:"), line
        port = int(line.split(":")[1].split()[0])
        cert = (pki.client_cert, pki.client_key) if client_cert else None
        with TLSClient(("127.0.0.1", port), pki, cert=cert) as client:
            client.sendall(b"example\n")
            assert recv_exactly(client, 8) == b"example\n"
        proc.terminate()
        assert proc.wait(15) == 0
        assert (b"client certificate: alice" in proc.stderr.read()) == client_cert


def test_logging_is_quiet_for_a_port_probe(serve, pki, caplog):
    server = tls_serve(serve, pki, "select")
    with caplog.at_level(logging.DEBUG, logger="sockserv"):
        with connect(server.server_address[1]) as sock:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            assert sock.recv(10) == b""
        wait_for(lambda: "closed before the handshake" in caplog.text, what="the debug line")
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "tls" in r.message]


def test_make_server_checks_the_files_before_binding(pki):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        config = Config(port=taken.getsockname()[1], tls_cert=str(pki.dir / "missing.pem"))
        with pytest.raises(ConfigError, match="tls_cert: cannot read"):
            sockserv.make_server(config, EchoHandler)  # not OSError: nothing was bound


def test_config_builds_without_touching_files():
    config = Config(tls_cert="/nonexistent/cert.pem")  # files are read when a server starts
    assert config.tls_cert == "/nonexistent/cert.pem"
    with pytest.raises(ConfigError, match="tls_cert: cannot read /nonexistent/cert.pem"):
        build_context(config)
