"""Timers for event loops: a heap of one-shot callbacks, and a coarse wheel for
idle deadlines that are pushed back on every bit of activity (pure, no I/O)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["IdleWheel", "Timer", "Timers"]


class Timer:
    """A scheduled callback; ``cancel()`` it any time before it runs."""

    __slots__ = ("when", "callback")

    def __init__(self, when: float, callback: Callable[[], Any] | None) -> None:
        self.when = when
        self.callback = callback

    def cancel(self) -> None:
        self.callback = None


class Timers:
    """One-shot timers: ``call_at(when, fn)``, ``next_deadline()``, ``run_due(now)``."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_at(self, when: float, callback: Callable[[], Any]) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].callback is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            callback, timer.callback = timer.callback, None
            if callback is not None:
                callback()

    def __len__(self) -> int:
        return sum(1 for _, _, t in self._heap if t.callback is not None)


class IdleWheel:
    """Expires items whose ``last`` activity time is older than ``timeout``.

    Activity costs nothing here: the item just updates its own ``last``. Each
    item sits in one bucket of ``resolution`` seconds; when a bucket comes due,
    items that were active since are moved to a later bucket and the others are
    handed to ``expire(item)``. Items need ``last`` and ``closed`` attributes.
    """

    def __init__(self, timers: Timers, timeout: float, expire: Callable[[Any], Any],
                 resolution: float | None = None) -> None:
        self.timers = timers
        self.timeout = timeout
        self.expire = expire
        self.resolution = resolution or max(0.01, min(1.0, timeout / 16))
        self._buckets: dict[int, list[Any]] = {}

    def add(self, item: Any) -> None:
        """Watch ``item``, whose deadline is ``item.last + timeout``."""
        slot = int((item.last + self.timeout) / self.resolution) + 1
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = []
            self.timers.call_at(slot * self.resolution, lambda: self._fire(slot))
        bucket.append(item)

    def _fire(self, slot: int) -> None:
        now = slot * self.resolution
        for item in self._buckets.pop(slot, ()):
            if item.closed:
                continue
            if item.last + self.timeout <= now:
                self.expire(item)
            else:
                self.add(item)
