"""A TLS echo server: the RFC 862 echo, encrypted, from Python with sockserv.Config.

The same without any code, from the command line:

    sockserv echo --tls-cert server.pem --tls-key server.key --port 7443
    sockserv echo --tls-cert server.pem --tls-key server.key --tls-ca ca.pem  # client certs

A throwaway self-signed certificate to try it with (valid for one day):

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \\
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \\
        -keyout server.key -out server.pem

Run this file, then talk to it with a real TLS client:

    python examples/tls_echo.py server.pem server.key --port 7443
    openssl s_client -connect 127.0.0.1:7443 -CAfile server.pem -quiet

With ``--ca ca.pem`` clients must show a certificate signed by that CA, and the
handler logs whose it is (``self.conn.peer_cert``).
"""

from __future__ import annotations

import argparse
import logging
import signal

import sockserv

log = logging.getLogger("tls_echo")


class Echo(sockserv.EchoHandler):
    """The stock echo (every byte back; after the client's close_notify or
    half-close the rest is flushed and the connection closed), plus a log line
    naming the client's certificate. The handler sees plain bytes: TLS is the
    engine's business, and connection_made comes after the handshake."""

    def connection_made(self) -> None:
        cert = self.conn.peer_cert  # None unless tls_ca makes clients show one
        if cert is not None:
            subject = dict(item for rdn in cert["subject"] for item in rdn)
            log.info("client certificate: %s", subject.get("commonName"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cert", help="PEM certificate chain of the server")
    parser.add_argument("key", help="PEM private key of the server")
    parser.add_argument("--ca", help="require client certificates signed by this CA")
    parser.add_argument("--port", type=int, default=7443, help="0 picks a free port")
    parser.add_argument("--engine", default="select", choices=["select", "thread", "fork"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    # Every setting of the command line is a keyword here; Config validates them.
    config = sockserv.Config(port=args.port, engine=args.engine, tls_cert=args.cert,
                             tls_key=args.key, tls_ca=args.ca, tls_handshake_timeout=5)
    # make_server reads and checks the certificate files (sockserv.ConfigError naming
    # the setting if they are wrong), then binds.
    server = sockserv.make_server(config, Echo)
    signal.signal(signal.SIGTERM, lambda *_: server.request_shutdown())  # safe in a handler
    signal.signal(signal.SIGINT, lambda *_: server.request_shutdown())
    host, port = server.server_address[:2]
    print(f"TLS echo on {host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()  # ends every connection gracefully, with close_notify


if __name__ == "__main__":
    main()
