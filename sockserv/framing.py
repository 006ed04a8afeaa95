"""Line framing as a pure class: feed bytes in, get complete lines out (sans-IO)."""

from __future__ import annotations

__all__ = ["LineFramer"]


class LineFramer:
    """Splits a byte stream into lines ending in ``\\n`` (a ``\\r`` before it is dropped too).

    ``feed(data)`` returns the lines completed by ``data``, without terminators.
    A line longer than ``max_line`` bytes (terminator excluded) sets ``too_long``;
    the lines before it are still returned, and nothing is returned after it.
    """

    __slots__ = ("max_line", "too_long", "_partial")

    def __init__(self, max_line: int = 65536) -> None:
        self.max_line = max_line
        self.too_long = False
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if self.too_long:
            return []
        if self._partial:
            self._partial += data
            if b"\n" not in data:
                self._check_partial()
                return []
            data = bytes(self._partial)
            self._partial.clear()
        elif b"\n" not in data:
            self._partial += data
            self._check_partial()
            return []
        lines = data.split(b"\n")
        self._partial += lines.pop()
        limit = self.max_line
        for i, line in enumerate(lines):
            if line[-1:] == b"\r":
                line = lines[i] = line[:-1]
            if len(line) > limit:
                self.too_long = True
                self._partial.clear()
                return lines[:i]
        self._check_partial()
        return lines

    def flush(self) -> bytes:
        """Return and forget the unterminated tail (e.g. at end of input), less a final ``\\r``."""
        tail = bytes(self._partial)
        self._partial.clear()
        return tail[:-1] if tail[-1:] == b"\r" else tail

    @property
    def pending(self) -> int:
        """Bytes of the current unterminated line."""
        return len(self._partial)

    def _check_partial(self) -> None:
        # A partial line may still shed a trailing "\r", so allow one byte more.
        if len(self._partial) > self.max_line + 1:
            self.too_long = True
            self._partial.clear()
