"""Releasing kept values: once the notebook drops its last reference, the holder drops it.

Every kept value that reaches the notebook is tracked by its holder process and key. When
the last :class:`~nbtask.notebook.kept.RemoteValue` of that key is garbage-collected (``del
x``, a name rebound), or the notebook's session ends, a release goes to the holder's own
queue: :class:`ReleaseTask`, a task signed like any other, so a release without the secret
is refused. It only drops the live object from the holder's memory: the store copy stays
until ``result_ttl`` (content addressing shares a blob with every other value of the same
bytes, so it is not deleted on one notebook's word).

Finalizers only note what went (they run wherever garbage is collected); the session's
ticker thread sends the releases.
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping

from nbtask.core.context import current_request
from nbtask.core.placement import live_holders
from nbtask.core.task import Task
from nbtask.notebook.kept import RemoteValue
from nbtask.wire.records import WorkerInfo

__all__ = ["ReleaseTask", "Releases"]

#: A holder process (its own queue and pid) and the key of a value it holds.
Held = tuple[str, int, str]


class ReleaseTask(Task):
    """Drops released values from the memory of the worker process that runs it."""

    name = "nbtask.release"
    abstract = False
    ignore_result = True

    def run(self, keys: list[str]) -> int:
        """Stop holding ``keys``; return how many were held."""
        request = current_request()
        holding = request.holding if request is not None else None
        if holding is None:
            return 0
        return sum(holding.drop(key) for key in keys)


class Releases:
    """The kept values this notebook references, and the releases due once they go.

    Parameters
    ----------
    send
        Sends one release: ``send(holder queue, keys)``.
    workers
        Reads the live workers (a release goes only to a live holder process).
    """

    def __init__(
        self,
        send: Callable[[str, list[str]], object],
        workers: Callable[[], Mapping[str, WorkerInfo]],
    ) -> None:
        self._send = send
        self._workers = workers
        self._counts: collections.Counter[Held] = collections.Counter()
        self._gone: queue.SimpleQueue[Held] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def track(self, value: RemoteValue) -> None:
        """Count ``value`` as a reference to what its holder holds, until it is collected."""
        if not value.holder:
            return
        held = (value.holder, value.holder_pid, value.key)
        with self._lock:
            self._counts[held] += 1
        # The finalizer must not take the lock: it may run inside track() itself.
        weakref.finalize(value, self._gone.put, held)

    def flush(self) -> None:
        """Send the releases due: values whose last reference was collected."""
        gone: list[Held] = []
        while not self._gone.empty():
            gone.append(self._gone.get())
        if not gone:
            return
        due = []
        with self._lock:
            for held in gone:
                self._counts[held] -= 1
                if self._counts[held] <= 0:
                    del self._counts[held]
                    due.append(held)
        self._release(due)

    def release_all(self) -> None:
        """The session ends: release every value it still references."""
        with self._lock:
            due = list(self._counts)
            self._counts.clear()
        self._release(due)

    def _release(self, due: Iterable[Held]) -> None:
        by_holder: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
        for holder, pid, key in due:
            by_holder[holder, pid].append(key)
        if not by_holder:
            return
        live = live_holders(self._workers())
        for (holder, pid), keys in by_holder.items():
            if (holder, pid) in live:  # a holder that ended holds nothing any more
                self._send(holder, keys)
