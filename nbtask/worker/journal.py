"""A task's journal: what a worker said about it, kept with it in the store.

The output of its handlers (``on_success``, ``after_return``...), which run after the
task's outcome was sent and so cannot be task output, and the worker's log lines about it
(a retry, a redelivery, a handler that raised). ``%nbtask log ID`` and ``nbtask log ID``
show it from anywhere, for ``result_ttl``; the worker's own log has it too.
"""

from __future__ import annotations

import logging
import threading

from nbtask.brokers import Store

__all__ = ["UNTIED", "Journal"]

log = logging.getLogger("nbtask.worker")

#: ``extra=`` of a log line a background thread says about no task: the worker's log alone.
UNTIED = {"untied": True}


class Journal(logging.Handler):
    """Writes what is said during one task's handling into that task's journal.

    Parameters
    ----------
    store
        Where journals are kept.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self._store = store
        self._task_id = ""
        self._partial = ""
        self._lock = threading.Lock()

    def about(self, task_id: str) -> None:
        """From now on, what is said is about ``task_id`` (``""``: about no task)."""
        self._flush_partial()  # (under its lock: a line another thread is writing is kept)
        self._task_id = task_id

    def emit(self, record: logging.LogRecord) -> None:
        """Keep a log record of the worker with the task it is handling."""
        if self._task_id and not getattr(record, "untied", False):
            self._keep([self.format(record)])

    def write(self, text: str) -> None:
        """Keep text a handler printed, a line at a time."""
        if not self._task_id:
            return
        with self._lock:
            text, self._partial = self._partial + text, ""
            *lines, self._partial = text.split("\n")
        if lines:
            self._keep(lines)

    def _flush_partial(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
        if rest and self._task_id:
            self._keep([rest])

    def _keep(self, lines: list[str]) -> None:
        try:
            self._store.append_journal(self._task_id, lines)
        except Exception:
            self._task_id = ""
