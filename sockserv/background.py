"""Background threads that leave the server's signals to the threads that act on them.

The kernel hands a process-directed signal to any thread that does not block it,
and Python runs its handler in the main thread only. A helper thread that takes a
SIGTERM leaves the main thread asleep: in ``recv`` (a fork child's reader), or in
``poll`` unless the loop's wakeup pipe is set with ``signal.set_wakeup_fd``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SERVER_SIGNALS", "start_thread"]

#: the signals sockserv's servers and supervisor act on
SERVER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def start_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    """Start a daemon thread with :data:`SERVER_SIGNALS` blocked from its first
    instruction (a new thread inherits its creator's mask); return it."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread
