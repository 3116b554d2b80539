"""Where work that reads kept values runs: on the process that holds them.

A kept value names the worker process that holds it live (:attr:`ValueRef.holder` and
``holder_pid``, in the signed result that brought the reference). A ``%%task`` cell that
reads one, or a function task given one as an argument, is sent to that process's own
queue while the worker registry shows it alive, so the value is used where it is, without
moving; otherwise the work goes where it would anyway, and the worker that takes it loads
the value from its store copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from nbtask.core.holding import holder_queue
from nbtask.core.refs import ValueRef
from nbtask.wire.records import WorkerInfo

__all__ = ["holder_queue_for", "live_holders"]


def holder_queue_for(
    values: Iterable[object],
    workers: Callable[[], Mapping[str, WorkerInfo]],
    requires: Sequence[str] = (),
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
    """
    kept = [v for v in values if isinstance(v, ValueRef) and v.holder]
    if not kept:
        return None
    live = live_holders(workers())
    for value in sorted(kept, key=lambda v: v.size, reverse=True):
        info = live.get((value.holder or "", value.holder_pid))
        if info is not None and set(requires) <= set(info.datasets):
            return value.holder
    return None


def live_holders(workers: Mapping[str, WorkerInfo]) -> dict[tuple[str, int], WorkerInfo]:
    """``{(own queue, pid): worker}`` of every live worker process.

    A process is told by its queue and pid: the process that replaced it (same queue) has
    not the value in memory, and serves the queue only for a while.
    """
    return {
        (holder_queue(consumer), pid): info
        for info in workers.values()
        for consumer, pid in zip(info.consumers, info.pids, strict=False)
    }
