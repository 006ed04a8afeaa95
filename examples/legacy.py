"""An old ``socketserver`` program on sockserv: the handler is unchanged; the server
gains sockserv's config (file, environment), logging, limits and graceful shutdown.

    python legacy.py                                # key-value store on 127.0.0.1:7007
    SOCKSERV_PORT=7100 SOCKSERV_MAX_CONNECTIONS=50 python legacy.py
    SOCKSERV_CONFIG=kv.toml python legacy.py        # settings from a TOML file

    $ nc 127.0.0.1 7007
    SET colour blue
    OK
    GET colour
    blue

Ctrl-C or SIGTERM: the server stops accepting, every open connection reads end
of file (so ``for line in self.rfile`` ends), gets up to ``shutdown_timeout``
seconds to finish, and the process exits 0. Without touching this file the
handler also runs under the sockserv command, with every setting as a flag:

    sockserv serve legacy:KeyValue --engine thread --idle-timeout 300
"""

import signal
import socketserver
import sys
import threading

import sockserv
from sockserv.config import ConfigError, load_config
from sockserv.log import setup_logging

# -- the old code: a socketserver handler, exactly as it was ----------------------------------


class KeyValue(socketserver.StreamRequestHandler):
    """SET <key> <value> -> OK; GET <key> -> the value (or an empty line)."""

    store: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def handle(self):
        for line in self.rfile:
            command, _, rest = line.strip().partition(b" ")
            if command == b"SET":
                key, _, value = rest.partition(b" ")
                with self.lock:
                    self.store[key] = value
                self.wfile.write(b"OK\n")
            elif command == b"GET":
                with self.lock:
                    self.wfile.write(self.store.get(rest, b"") + b"\n")
            else:
                self.wfile.write(b"ERR unknown command\n")


# -- what changes: sockserv's server class, with a config and a graceful stop ---------------


def main() -> int:
    try:  # SOCKSERV_* variables and SOCKSERV_CONFIG (a TOML file); exit 2 when bad
        config = load_config({})
    except ConfigError as exc:
        print(f"legacy: error: {exc}", file=sys.stderr)
        return 2
    log = setup_logging(config.log_level)
    # Before: socketserver.ThreadingTCPServer((HOST, PORT), KeyValue)
    try:
        server = sockserv.ThreadingTCPServer((config.host, config.port), KeyValue,
                                             config=config)
    except OSError as exc:  # port in use, permission denied: one line, exit 1
        print(f"legacy: error: cannot bind {config.host}:{config.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    stop = lambda signum, frame: server.request_shutdown()  # noqa: E731 -- signal-safe
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving key-value on %s", server.describe())
    try:
        server.serve_forever()  # returns after request_shutdown()
    finally:
        server.server_close()  # stop listening; open connections see EOF and finish
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
