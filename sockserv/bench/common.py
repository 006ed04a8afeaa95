"""Constants and helpers every part of the load generator shares: the workloads and their
defaults, payload header sizes, the error counters, selector events and the clock.
"""

from __future__ import annotations

import selectors
import time

__all__ = [
    "WORKLOADS", "DEFAULTS", "MAX_SIZE", "UDP_MAX_SIZE", "STAMP", "SOAK_STAMP", "UDP_HEADER",
    "REPORT_NS", "ERRORS", "READ", "WRITE", "now_ns",
]

WORKLOADS = ("pingpong", "pipeline", "connrate", "hold", "fanout", "udp", "soak")
# workload -> default connections, messages in flight (per connection or UDP socket)
DEFAULTS = {
    "pingpong": (50, 1),
    "pipeline": (50, 16),
    "connrate": (50, 1),
    "hold": (1000, 1),
    "fanout": (100, 1),
    "udp": (1, 50),
    "soak": (32, 1),
}
MAX_SIZE = 16 << 20
UDP_MAX_SIZE = 65507
STAMP = 24  # fanout/udp payload header: 16 hex digits of CLOCK_MONOTONIC ns + 8 of sequence
SOAK_STAMP = 28  # soak payload header: 4 hex digits of publisher, 16 of time, 8 of sequence
UDP_HEADER = 8  # udp payload header: 8 hex digits of sequence
REPORT_NS = 500_000_000  # how often a client process reports to the parent
ERRORS = ("mismatches", "resets", "timeouts", "connect_errors", "protocol")
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
now_ns = time.monotonic_ns
