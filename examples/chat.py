"""A chat room on the push hub: every line a member sends reaches every member.

    sockserv serve chat:ChatRoom --port 7000     # from this directory
    nc 127.0.0.1 7000                            # in two terminals: type a nick, then talk

    +OK welcome, send your nick
    alice
    MSG room * alice joined
    hello
    MSG room alice: hello
    MSG room bob: hi alice

Messages travel as push ``MSG <channel> <payload>`` lines through
``server.hub`` (a :class:`sockserv.Hub`), so the room works on every engine:
with ``--engine fork`` each member is a process of its own and with
``--workers 4`` members sit in different workers; sockserv relays the messages
between them. Server code can speak in the room too, from any thread::

    server.publish("room", "* the server restarts in 5 minutes")

A member whose unsent output passes ``max_buffer`` (a client that stopped
reading) is dropped from the room (``slow_consumer``): the others never wait for it.
"""

import re

import sockserv

NICK = re.compile(rb"[A-Za-z0-9_-]{1,32}")


class ChatRoom(sockserv.LineHandler):
    """One member: the first line is the nick, every later line is said to the room."""

    channel = b"room"
    uses_hub = True  # fork engine, workers: relay the hub's messages between processes

    def connection_made(self) -> None:
        self.nick: bytes | None = None
        self.conn.write(b"+OK welcome, send your nick\n")

    def line_received(self, line: bytes) -> None:
        hub = self.conn.server.hub
        if self.nick is None:
            if not NICK.fullmatch(line):
                self.conn.write(b"-ERR a nick is 1-32 letters, digits, _ or -\n")
                return
            self.nick = line
            hub.subscribe(self.channel, self.conn)  # from now on, MSG room ... lines
            hub.publish(self.channel, b"* " + line + b" joined")
        elif line:
            # Encoded once, handed to every member (this one too: it sees its own line).
            hub.publish(self.channel, self.nick + b": " + line)

    def connection_lost(self, exc: BaseException | None) -> None:
        hub = self.conn.server.hub
        if hub.unsubscribe_all(self.conn):  # was in the room: say goodbye for it
            hub.publish(self.channel, b"* " + self.nick + b" left")
