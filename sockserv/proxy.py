"""The PROXY protocol, versions 1 and 2, as HAProxy's ``proxy-protocol.txt`` defines
it: the header a load balancer sends at the start of a TCP connection to say whom
it relays. Pure functions and classes over bytes (sans-IO); the engines do the I/O
(see :mod:`sockserv.engines.proxied`).

:func:`parse_header` takes the bytes received so far and returns a
:class:`ProxyHeader` once a whole header is there, None while a valid header may
still follow, and raises :class:`ProxyError` (a ``ValueError`` with one reason) as
soon as the bytes cannot be the start of a valid header: the first byte already
tells a connection that sends no header (plain data, a TLS ClientHello) from one
that does, so a missing header is refused at once, not after a timeout.

Whatever follows the header is never part of it: :attr:`ProxyHeader.length` says
where the connection's own data begins. Since None means "every byte so far is
header", :class:`HeaderReader` lets an engine consume a header off a socket with
``MSG_PEEK`` and leave the bytes after it (a TLS ClientHello) in the socket.

Accepted: version 1 ``TCP4``, ``TCP6`` and ``UNKNOWN`` lines of at most 107 bytes
with strictly canonical fields; version 2 ``PROXY`` and ``LOCAL`` commands over
``AF_INET`` and ``AF_INET6`` (addresses used with a STREAM protocol), ``AF_UNSPEC``
and ``AF_UNIX`` (no address: the real peer stays), TLVs skipped. ``LOCAL``, v1
``UNKNOWN`` and the address families without an IP address give a header whose
``source`` is None: the connection's real peer (the load balancer itself) stays.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

__all__ = ["V1_MAX", "V2_SIGNATURE", "HeaderReader", "ProxyError", "ProxyHeader",
           "parse_header"]

V1_PREFIX = b"PROXY "
V1_MAX = 107  #: the longest version 1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  #: signature, version and command, family and protocol, length
V2_MAX = V2_FIXED + 0xFFFF

_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # inet_ntop writes ::ffff:a.b.c.d (mapped)
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_LINE_END = re.compile(rb"[\r\n]")
# what may follow "PROXY ": a prefix of the data must agree with one of these
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")

# version 2: the address families (high nibble of byte 14) and the block each needs
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_ADDRESS_SIZE = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_STREAM = 1

Address = tuple[str, int]


_NO_HEADER = "no header: the connection starts with other data"


class ProxyError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says why."""


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    """One parsed header.

    ``version`` 1 or 2; ``command`` ``"PROXY"`` (relayed for a client) or
    ``"LOCAL"`` (v2: the load balancer's own connection, e.g. a health check);
    ``length`` the header's size in bytes (the connection's data starts there);
    ``source`` and ``destination`` the client's and the address it connected to,
    as ``(host, port)``, or None when the header carries no IP address (v1
    ``UNKNOWN``, v2 ``LOCAL``, ``AF_UNSPEC``, ``AF_UNIX``): the connection's real
    peer stays.
    """

    version: int
    command: str
    length: int
    source: Address | None = None
    destination: Address | None = None


def parse_header(data: bytes) -> ProxyHeader | None:
    """Parse the header at the start of ``data`` (bytes after it are ignored).

    Returns the header once it is complete; None while ``data`` is a prefix that a
    valid header may still complete (then every byte of ``data`` belongs to the
    header); raises :class:`ProxyError` as soon as it cannot be one."""
    data = bytes(data)
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyError(_NO_HEADER)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
        raise ProxyError(_NO_HEADER)
    protocol = data[len(V1_PREFIX):len(V1_PREFIX) + 8]
    if not any(known.startswith(protocol[:len(known)]) for known in _V1_PROTOCOLS):
        raise ProxyError(f"version 1 protocol {_show(protocol.split(b' ')[0])} is not TCP4, "
                         "TCP6 or UNKNOWN")
    found = _LINE_END.search(data, 0, V1_MAX)
    if found is None:
        if len(data) >= V1_MAX - 1:  # no room left for the CRLF
            raise ProxyError(f"version 1 line without CRLF in its first {V1_MAX} bytes")
        return None
    end = found.start()
    if data[end:end + 1] == b"\n":
        raise ProxyError("version 1 line ends in a bare LF (CRLF expected)")
    if end > V1_MAX - 2:
        raise ProxyError(f"version 1 line without CRLF in its first {V1_MAX} bytes")
    if end + 1 == len(data):
        return None  # the CR is there, its LF not yet
    if data[end + 1:end + 2] != b"\n":
        raise ProxyError("version 1 line has a bare CR (CRLF expected)")
    length = end + 2
    fields = data[len(V1_PREFIX):end].split(b" ")
    if fields[0] == b"UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, "PROXY", length)
    if fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"version 1 protocol {_show(fields[0])} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise ProxyError("version 1 line does not have exactly 5 fields after PROXY, "
                         "separated by single spaces")
    family, src, dst, sport, dport = fields
    source = (_v1_address(family, src, "source"), _v1_port(sport, "source"))
    destination = (_v1_address(family, dst, "destination"), _v1_port(dport, "destination"))
    return ProxyHeader(1, "PROXY", length, source, destination)


def _v1_address(family: bytes, text: bytes, which: str) -> str:
    pattern = _IPV4 if family == b"TCP4" else _IPV6
    if pattern.fullmatch(text):
        try:
            address = ipaddress.ip_address(text.decode("ascii"))
        except ValueError:
            pass
        else:
            if address.version == (4 if family == b"TCP4" else 6):
                return str(address)
    kind = "IPv4" if family == b"TCP4" else "IPv6"
    raise ProxyError(f"version 1 {which} address {_show(text)} is not a canonical {kind} address")


def _v1_port(text: bytes, which: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyError(f"version 1 {which} port {_show(text)} is not a number 0-65535 "
                         "without leading zeros")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        raise ProxyError(_NO_HEADER)
    if len(data) <= len(V2_SIGNATURE):
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyError(f"version 2 signature with version {version} (2 expected)")
    if command > 1:
        raise ProxyError(f"version 2 command {command} is neither LOCAL (0) nor PROXY (1)")
    if len(data) < V2_FIXED:
        return None
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if len(data) < length:
        return None
    if command == 0:  # LOCAL: the family and addresses are to be ignored
        return ProxyHeader(2, "LOCAL", length)
    family, protocol = data[13] >> 4, data[13] & 0x0F
    if family > _AF_UNIX:
        raise ProxyError(f"version 2 address family {family} is unknown")
    if protocol > 2:
        raise ProxyError(f"version 2 transport protocol {protocol} is unknown")
    if family == _AF_UNSPEC or protocol == 0:
        return ProxyHeader(2, "PROXY", length)
    size = _ADDRESS_SIZE[family]
    if length - V2_FIXED < size:
        raise ProxyError(f"version 2 address block of {length - V2_FIXED} bytes is too short "
                         f"for its family ({size} bytes)")
    if family == _AF_UNIX or protocol != _STREAM:
        # A Unix socket has no IP address; a datagram protocol cannot be what arrived
        # over TCP. The spec says to fall back to the real peer for what one does not
        # support.
        return ProxyHeader(2, "PROXY", length)
    half = (size - 4) // 2
    block = data[V2_FIXED:V2_FIXED + size]
    src = str(ipaddress.ip_address(block[:half]))
    dst = str(ipaddress.ip_address(block[half:2 * half]))
    sport = int.from_bytes(block[2 * half:2 * half + 2], "big")
    dport = int.from_bytes(block[2 * half + 2:2 * half + 4], "big")
    return ProxyHeader(2, "PROXY", length, (src, sport), (dst, dport))


def _show(field: bytes) -> str:
    """A field of a bad line, for the error message (bounded, printable)."""
    text = field[:48].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(field) > 48 else ""))


class HeaderReader:
    """Reading one header off a stream socket without taking a byte past it.

    The engine peeks (``recv(reader.wanted, MSG_PEEK)``), calls :meth:`peeked`
    with what it saw, and then consumes exactly the count it returns (a plain
    ``recv`` of that many bytes, which are already there). Until the header is
    complete, every byte seen is header, so it is consumed and the socket does not
    stay readable for nothing; once it is, only its last bytes are consumed.
    """

    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = b""  #: the header bytes consumed so far

    @property
    def wanted(self) -> int:
        """How many bytes to peek at: enough for the rest of the longest header
        that can still follow (more are harmless; at least 1)."""
        received = self.received
        if len(received) >= V2_FIXED and received[0] == V2_SIGNATURE[0]:
            return max(1, V2_FIXED + int.from_bytes(received[14:16], "big") - len(received))
        return max(1, V1_MAX - len(received))

    def peeked(self, data: bytes) -> tuple[int, ProxyHeader | None]:
        """``(consume, header)``: how many of the peeked bytes ``data`` to take off
        the socket now, and the header once complete (else None). Raises
        :class:`ProxyError` for bytes that cannot be a header."""
        seen = self.received + data
        header = parse_header(seen)
        if header is None:
            self.received = seen
            return len(data), None
        consume = header.length - len(self.received)
        self.received = seen[:header.length]
        return consume, header
