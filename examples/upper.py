"""An uppercase service: a sockserv.LineHandler with one method.

Run it from this directory (``sockserv serve`` imports from the current one):

    sockserv serve upper:Upper                   # TCP on 127.0.0.1:7007
    sockserv serve upper:Upper --proto udp       # the same class over UDP, unchanged
    sockserv serve upper:Upper --engine fork     # ... or on another engine
    python upper.py --port 9000                  # the same, as a script

    $ printf 'hello\\nworld\\n' | nc -q1 127.0.0.1 7007
    HELLO
    WORLD

Every setting (``--max-line``, ``--idle-timeout``, ``--allow`` ...) works as for
``sockserv echo``; see ``sockserv serve --help``.
"""

import sockserv


class Upper(sockserv.LineHandler):
    """Answer every line in upper case.

    LineHandler does the framing: a line arrives without its "\\n" (or "\\r\\n");
    one longer than ``max_line`` gets ``-ERR line too long`` and the connection is
    closed. Over UDP each datagram is framed on its own.
    """

    def line_received(self, line: bytes) -> None:
        # One instance per TCP connection (or UDP peer); write() never blocks.
        self.conn.write(line.upper() + b"\n")


if __name__ == "__main__":  # python upper.py [options]: the same as sockserv serve upper:Upper
    import sys

    from sockserv.cli import main

    sys.exit(main(["serve", "upper:Upper", *sys.argv[1:]]))
