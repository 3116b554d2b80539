"""Releasing kept values: once the notebook drops its last reference, they are freed.

Every kept value that reaches the notebook is tracked by its holder process, key and
keeper id. When the last :class:`~nbtask.notebook.kept.RemoteValue` of it is
garbage-collected (``del x``, a name rebound), or the notebook's session ends, the value
is released, in two ways:

* its live object: a release goes to the holder's own queue, :class:`ReleaseTask`, a task
  signed like any other, so a release without the secret is refused;
* its store copy: the kernel itself removes the value's keeper from its blobs' uses in the
  store (:meth:`~nbtask.brokers.base.Store.release_blobs`), which deletes each blob no
  other use needs: not another kept value of the same bytes (another keeper), nor a
  task's arguments or result (those pin a blob for ``result_ttl``). So the store copy is
  freed even when the holder is gone; a kernel killed before it could release leaves it
  to ``result_ttl``. A keeper id is made for one kept value, so a release repeated (or
  replayed) finds it gone and deletes nothing.

A kept value sent with a cell stays referenced until that cell ends and its values are
written into the notebook (:meth:`Releases.hold`), so ``del x`` right after a cell that
reads ``x`` does not delete what the cell may load, nor what a name it binds to ``x``
(``alias = x``, sent back as ``x``'s reference) stands for.

Finalizers only note what went (they run wherever garbage is collected); the session's
ticker thread sends the releases.

A kernel killed sends no release. So while the session lives its ticker marks the keepers
of the values it references in the store (:meth:`Releases.namers`; a value's holder drops
it once no live session marks it: :mod:`nbtask.core.holding`), those tracked since the last
mark at once (a restarted kernel re-attached to them), all of them every
:func:`~nbtask.core.holding.naming_interval`.
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping

from nbtask.core.context import current_request
from nbtask.core.handle import TaskHandle
from nbtask.core.holding import keeper_namer
from nbtask.core.placement import live_holders
from nbtask.core.task import Task
from nbtask.notebook.kept import RemoteValue
from nbtask.wire.records import WorkerInfo

__all__ = ["ReleaseTask", "Releases"]

#: What a reference stands for: its holder (queue, pid), key, keeper and blob sizes.
Kept = tuple[str, int, str, str, tuple[tuple[str, int], ...]]


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
    free
        Releases store copies: ``free({keeper: {digest: size}})``.
    unwritten
        Whether a task that ended has values still to be written into the notebook.
    """

    def __init__(
        self,
        send: Callable[[str, list[str]], object],
        workers: Callable[[], Mapping[str, WorkerInfo]],
        free: Callable[[Mapping[str, Mapping[str, int]]], object],
        unwritten: Callable[[TaskHandle], bool] = lambda handle: False,
    ) -> None:
        self._send = send
        self._workers = workers
        self._free = free
        self._unwritten = unwritten
        self._counts: collections.Counter[Kept] = collections.Counter()
        self._gone: queue.SimpleQueue[Kept] = queue.SimpleQueue()
        self._held: list[tuple[TaskHandle, list[RemoteValue]]] = []
        #: The references tracked, told when everything is released (they may outlive it).
        self._values: weakref.WeakSet[RemoteValue] = weakref.WeakSet()
        self._lock = threading.Lock()
        #: Keepers tracked since they were last given by :meth:`namers`.
        self._unmarked: set[str] = set()

    def track(self, value: RemoteValue) -> None:
        """Count ``value`` as a reference to what it stands for, until it is collected."""
        if not value.holder and not value.keeper:
            return
        kept = _kept_of(value)
        with self._lock:
            self._counts[kept] += 1
            self._values.add(value)
            if kept[3]:
                self._unmarked.add(kept[3])
        # The finalizer must not take the lock: it may run inside track() itself.
        weakref.finalize(value, self._gone.put, kept)

    def hold(self, handle: TaskHandle, values: Iterable[object]) -> None:
        """Keep the kept ones of ``values`` referenced until ``handle``'s task ends.

        And until its values are written into the notebook (``unwritten``).
        """
        kept = [value for value in values if isinstance(value, RemoteValue)]
        if kept:
            with self._lock:
                self._held.append((handle, kept))

    def flush(self) -> None:
        """Send the releases due: values whose last reference was collected."""
        with self._lock:  # the values of ended tasks may be collected (and noted) now
            self._held = [h for h in self._held if not h[0].done() or self._unwritten(h[0])]
        gone: list[Kept] = []
        while not self._gone.empty():
            gone.append(self._gone.get())
        if not gone:
            return
        due = []
        with self._lock:
            for kept in gone:
                self._counts[kept] -= 1
                if self._counts[kept] <= 0:
                    del self._counts[kept]
                    due.append(kept)
            live = {kept[:3] for kept in self._counts}
        self._release(due, still_referenced=live)

    def namers(self, *, every: bool) -> list[str]:
        """The keepers' namers to mark in the store now (see :mod:`nbtask.core.holding`).

        Those tracked since the last call, or (``every``) those of every value still
        referenced, as a live session renews them.
        """
        with self._lock:
            keepers = {kept[3] for kept in self._counts} if every else set(self._unmarked)
            self._unmarked.clear()
        return sorted(keeper_namer(keeper) for keeper in keepers if keeper)

    def values(self) -> list[RemoteValue]:
        """The references tracked that are still in use."""
        with self._lock:
            return list(self._values)

    def release_all(self, why: str, *, sparing_running: bool = False) -> None:
        """The session ends: release every value it still references.

        The references left in the notebook say so (``why``) when used. ``sparing_running``:
        not those a task still running reads (the kernel ends, its cells run on).
        """
        with self._lock:
            spared = {
                _kept_of(value)
                for handle, values in self._held
                if sparing_running and not handle.done()
                for value in values
            }
            due = [kept for kept in self._counts if kept not in spared]
            self._counts.clear()
            self._held.clear()
            values = [value for value in self._values if _kept_of(value) not in spared]
            self._values.clear()
        for value in values:
            value.release(why)
        self._release(due, still_referenced=set())

    def _release(self, due: Iterable[Kept], still_referenced: set[tuple[str, int, str]]) -> None:
        by_holder: dict[tuple[str, int], set[str]] = collections.defaultdict(set)
        blobs: dict[str, dict[str, int]] = {}
        for holder, pid, key, keeper, sizes in due:
            # Another reference of the same kept value (its keeper) may still use it.
            if holder and (holder, pid, key) not in still_referenced:
                by_holder[holder, pid].add(key)
            if keeper:
                blobs[keeper] = dict(sizes)
        if blobs:
            self._free(blobs)
        if not by_holder:
            return
        live = live_holders(self._workers())
        for (holder, pid), keys in by_holder.items():
            if (holder, pid) in live:  # a holder that ended holds nothing any more
                self._send(holder, sorted(keys))


def _kept_of(value: RemoteValue) -> Kept:
    """What ``value`` references: its holder process, key, keeper and blobs."""
    blobs = tuple(sorted(value.blob_sizes.items()))
    return (value.holder or "", value.holder_pid, value.key, value.keeper, blobs)
