"""Readiness for the event loop: file descriptors registered with the object that
handles them, and a ``poll()`` that returns raw ``(fd, mask)`` pairs.

On Linux it drives the epoll object that ``selectors.DefaultSelector`` would pick,
directly: ``selectors`` builds a key tuple per ready descriptor, which costs the
loop about a fifth of its time under load. Elsewhere it wraps ``DefaultSelector``.
"""

from __future__ import annotations

import select
import selectors
from collections.abc import Callable
from typing import Any

__all__ = ["Poller"]

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Poller:
    """``register/modify(fd, events, obj)`` with selectors' EVENT_READ/EVENT_WRITE,
    ``unregister(fd)``, ``objects[fd]``, and ``poll(timeout)`` -> ``[(fd, mask)]``
    where ``mask & readable`` / ``mask & writable`` tell what is ready (an error or
    hang-up counts as both, so the next read or write reports it); ``mask ==
    only_readable`` when input is all there is."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.poll: Callable[[float | None], list[tuple[int, int]]]
        if hasattr(select, "epoll"):
            self._epoll = select.epoll()
            self.poll = self._epoll.poll
            trouble = select.EPOLLERR | select.EPOLLHUP
            self.readable = select.EPOLLIN | trouble
            self.writable = select.EPOLLOUT | trouble
            self.only_readable = select.EPOLLIN
            self._selector = None
        else:  # pragma: no cover - not Linux; _poll_selector then serves too
            self._selector = selectors.DefaultSelector()
            self.poll = self._poll_selector
            self.readable, self.writable = READ, WRITE
            self.only_readable = READ

    def _mask(self, events: int) -> int:
        return (select.EPOLLIN if events & READ else 0) | (select.EPOLLOUT if events & WRITE else 0)

    def register(self, fd: int, events: int, obj: Any, exclusive: bool = False) -> None:
        """``exclusive``: of several processes waiting on ``fd``, wake one (EPOLLEXCLUSIVE)."""
        if self._selector is None:
            extra = select.EPOLLEXCLUSIVE if exclusive else 0
            self._epoll.register(fd, self._mask(events) | extra)
        else:  # pragma: no cover
            self._selector.register(fd, events)
        self.objects[fd] = obj

    def modify(self, fd: int, events: int, obj: Any) -> None:
        if self._selector is None:
            self._epoll.modify(fd, self._mask(events))
        else:  # pragma: no cover
            self._selector.modify(fd, events)
        self.objects[fd] = obj

    def unregister(self, fd: int) -> None:
        del self.objects[fd]
        if self._selector is None:
            self._epoll.unregister(fd)
        else:  # pragma: no cover
            self._selector.unregister(fd)

    def __contains__(self, fd: int) -> bool:
        return fd in self.objects

    def _poll_selector(self, timeout: float | None = None) -> list[tuple[int, int]]:
        return [(key.fd, mask) for key, mask in self._selector.select(timeout)]

    def close(self) -> None:
        if self._selector is None:
            self._epoll.close()
        else:  # pragma: no cover
            self._selector.close()
