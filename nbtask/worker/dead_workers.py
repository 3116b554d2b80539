"""Cleaning up after workers that stopped sending heartbeats.

What a dead worker's processes held is settled as lost, what waits on their own queues
(or is parked for them until its due time) is sent on to the queues it falls back to (as
a stopping worker does for its own), and
the worker is forgotten once the broker lets its queues go.

A lapsed heartbeat is not proof of death: a live worker misses its heartbeats when its
supervisor pauses (a long GC pause, SIGSTOP, a stopped VM, a slow broker). Before
anything of its is deleted, the worker is looked at again: one that beats again, whose
process still runs on this host, or whose processes still read its queues, keeps its
queues and registry entry (leases unrenewed for the visibility timeout are still lost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from nbtask._process import runs_here
from nbtask.brokers import Transport
from nbtask.core.holding import holder_queue
from nbtask.wire.envelope import Signer
from nbtask.wire.records import WorkerInfo
from nbtask.worker.lost import LostTasks

__all__ = ["DeadWorkers"]

log = logging.getLogger(__name__)

#: Dead workers one heartbeat cleans up after at most, the rest at the next ones: a
#: registry holding thousands of dead entries (planted: nbtask writes one per worker)
#: would keep this worker from its next heartbeats, and others would take it for dead.
RECLAIM_PER_BEAT = 100
#: Seconds between the reads of an idle worker process at most (its fetch's wait, see
#: ``Child._serve``): one that read within heartbeats and this is taken for alive.
_READ_EVERY = 1.0


class DeadWorkers:
    """The clean-up after dead workers that one worker does at its heartbeats.

    Parameters
    ----------
    worker_id
        This worker (never cleaned up after by itself).
    transport
        The broker, with its store.
    signer
        What this worker can verify: it leaves a dead worker whose messages it cannot to
        a worker with its secrets.
    lost
        Settles lost deliveries and moves what waits on a gone process's queue.
    visibility_timeout
        Seconds a lease goes unrenewed before its delivery counts as lost.
    heartbeat_interval
        Seconds between heartbeats (a worker misses three before it looks dead).
    """

    def __init__(
        self,
        worker_id: str,
        transport: Transport,
        signer: Signer,
        lost: LostTasks,
        visibility_timeout: float,
        heartbeat_interval: float,
    ) -> None:
        self.worker_id = worker_id
        self.transport = transport
        self.signer = signer
        self.lost = lost
        self.visibility_timeout = visibility_timeout
        self._read_within = 3 * heartbeat_interval + _READ_EVERY
        self._left_to_others: set[str] = set()  # dead workers whose secrets this one lacks
        self._queues_left: set[str] = set()  # dead workers whose queues are still consumed
        self._alive: set[str] = set()  # workers that missed heartbeats, yet were alive

    def reclaim(self) -> None:
        """Settle what dead workers held, send on what waits for their processes, forget them."""
        store = self.transport.store
        claimed = 0
        for worker_id, info in store.dead_workers().items():
            if claimed >= RECLAIM_PER_BEAT:
                break
            if worker_id == self.worker_id or not self._can_verify_for(worker_id, info):
                continue
            if not store.claim_dead_worker(worker_id):
                continue
            claimed += 1
            if info is None:  # an entry nbtask did not write: nothing to settle
                log.warning("dropped unreadable worker entry %r from the registry", worker_id)
                store.forget_worker(worker_id)
                continue
            # Asked first: settling below reads as its consumers, which looks like a read.
            alive = self._alive_yet(worker_id, info)
            reason = _silent(worker_id, info)
            # Only leases nobody renewed for the visibility timeout: a worker that merely
            # paused past its heartbeats keeps the tasks it is still running.
            idle = self.visibility_timeout
            settled = 0
            for consumer in info.consumers:
                for delivery in self.transport.held(info.queues, consumer, min_idle=idle):
                    self.lost.settle(delivery, reason)
                    settled += 1
            if settled:
                log.warning("settled %d task(s) of dead worker %s", settled, worker_id)
            if alive:
                # Nothing of its deleted: it is looked at again at a later heartbeat.
                _say_once(
                    self._alive,
                    worker_id,
                    "worker %s missed its heartbeats but is alive (%s); its queues and "
                    "registry entry are kept",
                    alive,
                )
                continue
            still_held = self.transport.holds_any(info.queues, info.consumers)
            # After holds_any, which would recreate its queues. One the broker still sees
            # consumed (RabbitMQ notices a dropped connection late, or never while a fork
            # holds the socket) gets what it is given back once it does: the entry stays,
            # so it is looked at again at a later heartbeat, here or by another worker.
            left = self.rehome(info.consumers)
            if left:
                self._note_queues_left(worker_id, left)
            if not still_held and not left:
                store.unregister(worker_id)
                store.forget_holdings(info.consumers)
                self.transport.forget_consumers(info.consumers, info.queues)
                self._queues_left.discard(worker_id)
                self._alive.discard(worker_id)
                log.warning("cleaned up after dead worker %s", worker_id)

    def _note_queues_left(self, worker_id: str, queues: Sequence[str]) -> None:
        """Say once per dead worker that some of its processes' queues are left for now."""
        _say_once(
            self._queues_left,
            worker_id,
            "dead worker %s: queue(s) %s cannot be deleted yet (still consumed, a message "
            "came meanwhile, or messages parked for it are left to move); looking again at "
            "later heartbeats",
            ", ".join(repr(q) for q in queues),
        )

    def rehome(self, consumers: Sequence[str], until: float = 0.0) -> list[str]:
        """Send on what still waits on the own queues of processes that are gone.

        Until ``until`` (``time.monotonic()``), a queue the broker still sees consumed is
        tried again (see :meth:`LostTasks.rehome`). Returns the queues left in place.
        """
        left = []
        for consumer in consumers:
            queue = holder_queue(consumer)
            moved, gone = self.lost.rehome(queue, consumer, until)
            if moved:
                log.warning("moved %d task(s) waiting for process %s elsewhere", moved, consumer)
            if not gone:
                left.append(queue)
        return left

    def _alive_yet(self, worker_id: str, info: WorkerInfo) -> str:
        """How a worker whose heartbeat lapsed shows it is alive; "" if it does not.

        It beat again since it was read, its supervisor's process still runs on this host,
        or its processes still read its queues (Redis: they read at least once a second
        when idle). Only the queues its clean-up does not read as its consumers are
        looked at: not its processes' own.
        """
        if self.transport.store.beats(worker_id):
            return "it beats again"
        if runs_here(info.place, info.pid, info.started, info.start_ticks):
            return f"its process {info.pid} runs on this host"
        own = {holder_queue(consumer) for consumer in info.consumers}
        shared = [queue for queue in info.queues if queue not in own]
        if self.transport.still_reading(info.consumers, shared, self._read_within):
            return "its processes still read its queues"
        return ""

    def _can_verify_for(self, worker_id: str, info: WorkerInfo | None) -> bool:
        """Whether this worker may clean up after a dead one: it can verify its messages.

        One that cannot would take a genuine message signed with a secret it lacks (another
        app's, on the same key prefix) for a forgery and dead-letter it: the dead worker is
        left to a worker with its secrets, e.g. the next one of its own app.
        """
        if info is None or info.verifiable_with(self.signer.accepted_key_ids):
            return True
        _say_once(
            self._left_to_others,
            worker_id,
            "left dead worker %r to a worker with its secrets: this one cannot verify its messages",
        )
        return False


def _silent(worker_id: str, info: WorkerInfo) -> str:
    """Why a dead worker's tasks are lost: all that is known is that it stopped answering."""
    since = f" for {time.time() - info.seen:.0f} s" if info.seen > 0 else ""
    return f"worker {worker_id} stopped answering{since}: it died, or was paused or cut off"


def _say_once(said: set[str], worker_id: str, message: str, *args: object) -> None:
    """Log ``message`` (its first ``%`` field the worker) once per dead worker in ``said``."""
    if worker_id not in said:
        said.add(worker_id)
        log.warning(message, worker_id, *args)
