"""The bytes the clients send: a ring of random messages (echo workloads) and rotating
fillers (stamped fanout, udp and soak payloads).
"""

from __future__ import annotations

import math
import random

__all__ = ["Payloads", "fills"]


class Payloads:
    """A ring of ``count`` distinct random messages of ``size`` bytes.

    Connection ``i`` sends the ring's messages from ``start(i)`` on, so what it
    must read back at stream offset ``pos`` starts at ring offset
    ``(start(i) * size + pos) % ring_len``; ``ring2`` repeats the ring so any
    chunk up to ``extra`` bytes can be checked with one ``startswith`` (no copy).
    """

    def __init__(self, size: int, extra: int, seed: int = 7007) -> None:
        self.size = size
        self.count = max(16, min(4096, math.ceil(262144 / size)))
        rng = random.Random(seed)
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        self.ring = bytes(rng.choices(alphabet, k=size * self.count))
        self.ring_len = len(self.ring)
        copies = 1 + math.ceil(max(extra, 65536) / self.ring_len)
        self.ring2 = self.ring * copies
        self.view = memoryview(self.ring2)

    def start(self, conn_id: int) -> int:
        """The ring message connection ``conn_id`` starts with."""
        return (conn_id * 131) % self.count


def fills(length: int) -> list[bytes]:
    """26 filler strings of ``length`` letters, rotated: filler ``seq % 26`` goes with ``seq``."""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    reps = length // 26 + 2
    return [(letters[i:] + letters * reps)[:length] for i in range(26)]
