"""Logging setup: one stderr handler on the ``sockserv`` logger.

Under journald (``JOURNAL_STREAM`` names the device and inode of our stderr, as
systemd sets it for ``StandardError=journal``), each line starts with a
``<N>`` syslog priority (sd-daemon(3)) and carries no timestamp or pid: the
journal records both. Elsewhere the lines are plain and timestamped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["JournalFormatter", "RateLimitedLog", "journal_stream", "setup_logging"]

FORMAT = "%(asctime)s sockserv[%(process)d] %(levelname)s %(message)s"
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}  # syslog levels: debug, info, warning, err, crit


def journal_stream(stream: TextIO | None = None) -> bool:
    """True when ``JOURNAL_STREAM`` (``device:inode``) is ``stream`` (default stderr)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<N>message``: every line (a traceback's too) gets the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        level = max((lvl for lvl in PRIORITIES if lvl <= record.levelno), default=logging.DEBUG)
        prefix = f"<{PRIORITIES[level]}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup_logging(level: str = "info") -> logging.Logger:
    """Send ``sockserv`` (and ``sockserv.access``) records at ``level`` or above to stderr."""
    logger = logging.getLogger("sockserv")
    for handler in list(logger.handlers):
        if getattr(handler, "sockserv", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.sockserv = True  # type: ignore[attr-defined]
    handler.setFormatter(JournalFormatter("%(message)s") if journal_stream()
                         else logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


class RateLimitedLog:
    """Log through ``logger`` at most once per ``interval`` seconds: for events that
    can come thousands of times a second (denied peers, accept failures).

    ``log(level, msg, *args)`` logs, or counts the record as suppressed and returns
    False; the next record logged ends with ``(N more suppressed)``. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._last: float | None = None
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at ``level`` unless a record went out less than
        ``interval`` seconds ago; True if it was logged."""
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.interval:
                self.suppressed += 1
                return False
            self._last = now
            suppressed, self.suppressed = self.suppressed, 0
        if suppressed:
            msg += " (%d more suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
        return True
