"""nbtask's own warnings in a kernel, as one line saying they are nbtask's.

The client's records (``event channel unreachable (...)``, ``event channel readable again
after 6.5 s``, from the thread reading events) go to the ``nbtask`` loggers. In a kernel
whose notebook set up no logging, Python shows them through its last resort: the message
alone, under whatever cell runs, with nothing saying where it came from (and, for an error,
a traceback of nbtask's own frames). :class:`OwnLines` shows them as nbtask's other
notebook messages look instead: ``nbtask: event channel readable again after 6.5 s``, one
line. A notebook that set up logging (``logging.basicConfig``, a handler of its own on the
way to the root logger) gets them through its handlers as before, not twice.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["OwnLines"]

_LOGGER = "nbtask"


class OwnLines(logging.Handler):
    """Shows nbtask's warnings and errors as ``nbtask: ...`` lines where no handler would.

    Added to the ``nbtask`` logger while a notebook session lives (:meth:`add`,
    :meth:`remove`); it writes to ``sys.stderr`` as it is at each record, as logging's last
    resort does (in a kernel, the output of the cell running).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def add(self) -> None:
        """Show nbtask's records from now on (once, however often it is added)."""
        logger = logging.getLogger(_LOGGER)
        if self not in logger.handlers:
            logger.addHandler(self)

    def remove(self) -> None:
        """Leave nbtask's records to logging again."""
        logging.getLogger(_LOGGER).removeHandler(self)

    def format(self, record: logging.LogRecord) -> str:
        """``nbtask: <message>``, an exception's type and text in brackets: one line."""
        line = f"nbtask: {record.getMessage()}"
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            line += f" ({type(error).__name__}: {error})"
        return line

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record's line, unless a handler of the notebook's gets the record."""
        if _handled_elsewhere(record.name, self):
            return
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _handled_elsewhere(name: str, ours: logging.Handler) -> bool:
    """Whether a record of logger ``name`` reaches a handler other than ``ours``.

    As logging decides whether to use its last resort: any handler on the way up to the
    root logger (while loggers propagate), whatever its level.
    """
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        if any(handler is not ours for handler in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False
