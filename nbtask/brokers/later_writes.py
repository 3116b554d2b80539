"""Writes a process hands to one thread of its own, so the work that asked need not wait.

A worker process that keeps a large value a cell assigned holds it live: the notebook's
later work on it goes to that process. Its store copy serves only when that process is
gone or busy, or when the notebook fetches the value, and writing hundreds of megabytes
into Redis takes longer than making them. So the copy is written here, after the cell's
outcome went out (:meth:`~nbtask.brokers.redis_blobs.RedisBlobs.put_blobs`, ``later=``):
a write given here waits for :meth:`LaterWrites.start`, which the worker calls once the
outcome is stored, so that hundreds of megabytes on their way into Redis do not hold up
the outcome itself.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable

__all__ = ["LaterWrites"]

log = logging.getLogger(__name__)


class LaterWrites:
    """One thread running the writes given to it, in order, each once :meth:`start` let it."""

    def __init__(self) -> None:
        self._held: list[tuple[Callable[[], None], list[str]]] = []
        self._jobs: collections.deque[tuple[Callable[[], None], list[str]]] = collections.deque()
        self._changed = threading.Condition()
        self._busy = False
        self._running: list[str] = []  # the leases of the write running now
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None], leases: Iterable[str] = ()) -> None:
        """Run ``job`` after the writes before it, once :meth:`start` is called.

        A failure is logged, never raised. ``leases``: what says the job's writes are
        coming, renewed until it has run (:meth:`leases`).
        """
        with self._changed:
            self._held.append((job, list(leases)))

    @property
    def holding(self) -> bool:
        """Whether writes given wait for :meth:`start`."""
        with self._changed:
            return bool(self._held)

    def start(self) -> None:
        """Let the writes given so far run."""
        with self._changed:
            if not self._held:
                return
            self._jobs.extend(self._held)
            self._held.clear()
            if self._thread is None or not self._thread.is_alive():
                # A process forked by task code finds the deque but not the thread.
                self._thread = threading.Thread(
                    target=self._run, name="nbtask-later-writes", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def leases(self) -> list[str]:
        """The leases of the writes queued or running: a write waiting its turn is alive too."""
        with self._changed:
            queued = [*self._jobs, *self._held]
            return list(dict.fromkeys([*self._running, *(k for _, ks in queued for k in ks)]))

    def wait(self, timeout: float | None = None) -> bool:
        """Start and wait for every write given so far; whether all are done (else: timed out)."""
        self.start()
        with self._changed:
            return self._changed.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._jobs))
                job, self._running = self._jobs.popleft()
                self._busy = True
            try:
                job()
            except Exception:
                log.exception("a store copy written in the background failed")
            finally:
                # The job holds the value's buffers: once written, a value the notebook
                # released must not stay in memory until the next write comes.
                del job
                with self._changed:
                    self._busy, self._running = False, []
                    self._changed.notify_all()
