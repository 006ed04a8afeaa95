"""The latency histogram (HDR-style log buckets, mergeable across processes)."""

from __future__ import annotations

import math

__all__ = ["Histogram"]


class Histogram:
    """Latency histogram in nanoseconds with HDR-style log buckets.

    Values below 256 are exact; above, each power of two is split into 128
    buckets, so a percentile is off by at most 0.4%. Histograms from several
    processes merge by adding their bucket counts.
    """

    SUB = 128
    LINEAR = 256
    SIZE = LINEAR + 56 * SUB

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.n = 0
        self.total = 0
        self.max = 0

    @classmethod
    def index(cls, value: int) -> int:
        """The bucket of a value (ns)."""
        if value < cls.LINEAR:
            return max(value, 0)
        shift = value.bit_length() - 8
        return cls.LINEAR + (shift - 1) * cls.SUB + (value >> shift) - cls.SUB

    @classmethod
    def value(cls, index: int) -> int:
        """The middle of a bucket (ns)."""
        if index < cls.LINEAR:
            return index
        shift, top = divmod(index - cls.LINEAR, cls.SUB)
        shift += 1
        return ((top + cls.SUB) << shift) + (1 << (shift - 1))

    def record(self, value: int) -> None:
        """Count one latency of ``value`` ns."""
        if value < 256:
            self.counts[value if value > 0 else 0] += 1
        else:
            shift = value.bit_length() - 8
            self.counts[(shift << 7) + (value >> shift)] += 1
        self.n += 1
        self.total += value
        if value > self.max:
            self.max = value

    def percentile(self, q: float) -> int:
        """The value (ns) at or below which ``q`` percent of the samples lie; 0 when empty."""
        if not self.n:
            return 0
        rank = max(1, math.ceil(q / 100 * self.n))
        seen = 0
        for index, count in enumerate(self.counts):
            if count:
                seen += count
                if seen >= rank:
                    return min(self.value(index), self.max)
        return self.max

    def state(self) -> tuple[dict[int, int], int, int, int]:
        """A compact picklable copy: (non-zero buckets, n, total, max)."""
        return {i: c for i, c in enumerate(self.counts) if c}, self.n, self.total, self.max

    def merge(self, state: tuple[dict[int, int], int, int, int]) -> None:
        """Add a :meth:`state` of another histogram."""
        buckets, n, total, top = state
        for index, count in buckets.items():
            self.counts[index] += count
        self.n += n
        self.total += total
        self.max = max(self.max, top)

    def summary(self) -> dict[str, float] | None:
        """p50/p90/p99/p99.9/max/mean in microseconds, or None without samples."""
        if not self.n:
            return None
        out = {f"p{q:g}": round(self.percentile(q) / 1000, 1) for q in (50, 90, 99, 99.9)}
        out["max"] = round(self.max / 1000, 1)
        out["mean"] = round(self.total / self.n / 1000, 1)
        return out
