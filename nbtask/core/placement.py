"""Where work that reads kept values runs: on the process that holds them, unless it is busy.

A kept value names the worker process that holds it live (:attr:`ValueRef.holder` and
``holder_pid``, in the signed result that brought the reference). A ``%%task`` cell that
reads one, or a function task given one as an argument, is sent to that process's own
queue while the worker registry shows it alive, so the value is used where it is, without
moving; otherwise the work goes where it would anyway, and the worker that takes it loads
the value from its store copy.

Waiting for a busy holder can cost more than moving the value. The work goes where it
would anyway instead (:class:`Moving`) when the holder's process runs a task, another
process serving that queue is idle, the values the holder would lend total at most
``move_bytes``, and their store copy is whole: the process that takes it loads them (a
cell's process then holds them, and the notebook sends later work there). The registry
says who runs what as the workers last announced it: a child that holds kept values
announces each task it starts or ends at once, any other at its heartbeats. Work this
client sent to the holder's own queue and has not seen end counts as well, so calls sent
back to back on one value spread over the idle processes instead of queueing behind the
first. The store is asked only once the rest says moving pays: whether the task the
holder runs has ended since (its record), then whether the store copy is there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from nbtask.brokers.base import Store
from nbtask.core.holding import holder_queue
from nbtask.core.refs import ValueRef, blobs_of
from nbtask.wire.events import State
from nbtask.wire.records import WorkerInfo

__all__ = ["Moving", "holder_queue_for", "live_holders"]


@dataclasses.dataclass(frozen=True)
class Moving:
    """When work on kept values goes elsewhere rather than wait for their busy holder.

    Parameters
    ----------
    queue
        Where the work goes if not to the holder: where it would go without kept values.
    move_bytes
        The most bytes of kept values it may load there (0: always wait for the holder).
    has_copies
        Whether the store keeps the blobs ``{digest: size}`` whole.
    ended
        Whether a task the registry lists as running has ended since.
    sent_to
        Whether work this client sent to a queue has not ended yet.
    """

    queue: str
    move_bytes: int
    has_copies: Callable[[Mapping[str, int]], bool]
    ended: Callable[[str], bool]
    sent_to: Callable[[str], bool]

    @classmethod
    def through(
        cls, store: Store, queue: str, move_bytes: int, sent_to: Callable[[str], bool]
    ) -> Moving:
        """Moving to ``queue``, with ``store`` telling copies and ended tasks."""
        ended = functools.partial(_ended, store)
        return cls(queue, move_bytes, store.has_blobs, ended, sent_to)

    def beats_waiting(
        self, held: Sequence[ValueRef], holder: str, workers: Mapping[str, WorkerInfo]
    ) -> bool:
        """Whether the work goes to :attr:`queue` rather than wait for ``holder``.

        ``held``: the kept values the work reads that the process serving ``holder``
        (its own queue) holds.
        """
        if sum(value.size for value in held) > self.move_bytes:
            return False
        children = list(_children(workers))
        running = next((task for _, own, _, task in children if own == holder), None)
        idle_elsewhere = any(
            task == "" and pid and own != holder and self.queue in info.queues
            for info, own, pid, task in children
        )
        if not idle_elsewhere:
            return False
        # The store is asked last, and only when the rest says moving pays.
        if not self.sent_to(holder) and (not running or self.ended(running)):
            return False
        return self.has_copies(blobs_of(held))


def holder_queue_for(
    values: Iterable[object],
    workers: Callable[[], Mapping[str, WorkerInfo]],
    requires: Sequence[str] = (),
    moving: Callable[[], Moving] | None = None,
) -> str | None:
    """The queue of a live process holding the largest of the kept ``values``, if any.

    Parameters
    ----------
    values
        The values the work reads (kept ones are :class:`ValueRef`).
    workers
        Reads the live workers (called only when a kept value names a holder).
    requires
        Datasets the work needs: a holder whose worker lacks one is passed over.
    moving
        Makes the rule for when the work goes elsewhere rather than wait for that
        process, busy (``None`` returned); called only when a holder is live. Without
        it the work always goes to the holder.
    """
    kept = [v for v in values if isinstance(v, ValueRef) and v.holder]
    if not kept:
        return None
    registry = workers()
    live = live_holders(registry)
    for value in sorted(kept, key=lambda v: v.size, reverse=True):
        place = (value.holder or "", value.holder_pid)
        info = live.get(place)
        if info is None or not set(requires) <= set(info.datasets):
            continue
        held = [v for v in kept if (v.holder, v.holder_pid) == place]
        if moving is not None and moving().beats_waiting(held, place[0], registry):
            return None
        return place[0]
    return None


def live_holders(workers: Mapping[str, WorkerInfo]) -> dict[tuple[str, int], WorkerInfo]:
    """``{(own queue, pid): worker}`` of every live worker process.

    A process is told by its queue and pid: the process that replaced it (same queue) has
    not the value in memory, and serves the queue only for a while.
    """
    return {(own, pid): info for info, own, pid, _ in _children(workers)}


def _children(
    workers: Mapping[str, WorkerInfo],
) -> Iterator[tuple[WorkerInfo, str, int, str | None]]:
    """Each worker child: its worker, own queue, pid (0: none now) and task ("" idle).

    The task is ``None`` when the entry does not say which child runs what (an older
    nbtask's).
    """
    for info in workers.values():
        told = len(info.running) == len(info.consumers)
        for slot, (consumer, pid) in enumerate(zip(info.consumers, info.pids, strict=False)):
            yield info, holder_queue(consumer), pid, info.running[slot] if told else None


def _ended(store: Store, task_id: str) -> bool:
    # The registry can be a moment behind a task's end, which its record already shows:
    # the final state is stored with the event that told the client, so work sent on
    # right after a cell ended finds the holder free.
    record = store.get_record(task_id)
    return record is not None and (record.final or record.state is State.RETRY)
