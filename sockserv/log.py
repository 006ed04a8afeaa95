"""Logging setup: one stderr handler on the ``sockserv`` logger."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

FORMAT = "%(asctime)s sockserv[%(process)d] %(levelname)s %(message)s"


def setup_logging(level: str = "info") -> logging.Logger:
    """Send ``sockserv`` (and ``sockserv.access``) records at ``level`` or above to stderr."""
    logger = logging.getLogger("sockserv")
    for handler in list(logger.handlers):
        if getattr(handler, "sockserv", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.sockserv = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger
