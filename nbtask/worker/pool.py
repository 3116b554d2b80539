"""A worker's child processes: one per slot, forked, replaced, and stopped on purpose.

The supervisor (:mod:`nbtask.worker.supervisor`) decides what a child serves and settles
what a dead child held through the broker; this module owns the processes themselves and
the memory each shares with the supervisor (:class:`~nbtask.worker.slots.SlotState`): it
forks them, reaps those that exit, replaces them (backing off when one keeps dying at
start), and kills a child whose task passed its hard time limit or ignored a terminate
request past its grace period, then ends what its task left running in its process group
(:mod:`nbtask.worker.left_running`). Nothing here talks to a broker.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.process import BaseProcess
from typing import NamedTuple

from nbtask.core.options import WORKER_OWN_SIGNALS
from nbtask.worker.child import Child
from nbtask.worker.left_running import LeftRunning
from nbtask.worker.slots import SlotState

__all__ = ["ChildPool", "Ended"]

log = logging.getLogger("nbtask.worker")

_TICK_SECONDS = 0.1
_TERMINATE_MEMORY_SECONDS = 10.0  # how long a terminate waits for its task to show up
_CRASH_LOOP_SECONDS = 1.0  # a child that dies younger than this is respawned with backoff


class Ended(NamedTuple):
    """What the supervisor needs to settle after a child process ended."""

    #: Why its tasks are lost: the process and its exit code.
    reason: str
    #: The stop this supervisor ordered for it, if any: (task id, why, when to kill).
    stopped: tuple[str, str, float] | None
    #: The task its slot named when it ended ("" if none): the task it ran.
    task_id: str


class ChildPool:
    """The child processes of one worker, by slot.

    Parameters
    ----------
    concurrency
        Slots, hence child processes.
    make_child
        The child to run in a slot: ``make_child(slot, state, replaces)``, where
        ``state`` is the slot's shared memory and ``replaces`` says whether a child ran
        in that slot before.
    """

    def __init__(
        self, concurrency: int, make_child: Callable[[int, SlotState, bool], Child]
    ) -> None:
        self._make_child = make_child
        #: slot -> its child process, while it runs.
        self.processes: dict[int, BaseProcess] = {}
        #: What each slot's child is running, written by the child.
        self.slots = [SlotState() for _ in range(concurrency)]
        # slot -> (task id, why it is being stopped, when to SIGKILL it)
        self._stopping: dict[int, tuple[str, str, float]] = {}
        # task id -> (when to stop looking for it, grace period, the signal to send)
        self._terminates: dict[str, tuple[float, float, signal.Signals]] = {}
        self._killed: set[int] = set()
        self._spawned_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._respawn_at: dict[int, float] = {}
        self._exit_fds: dict[int, int] = {}  # slot -> a pidfd of its child, where there is one
        # The process groups of children that exited, with processes their tasks left.
        self._left_running = LeftRunning()
        self._context = multiprocessing.get_context("fork")

    def pids(self) -> tuple[int, ...]:
        """The pid of each slot's child (0 for a slot with none running)."""
        return tuple(
            (self.processes[slot].pid or 0) if slot in self.processes else 0
            for slot in range(len(self.slots))
        )

    def spawn(self, slot: int) -> None:
        """Fork a child process for ``slot``."""
        child = self._make_child(slot, self.slots[slot], slot in self._spawned_at)
        process = self._context.Process(target=child.run, name=f"nbtask-child-{slot}")
        process.start()
        if process.pid:
            # The child makes its group too; made here as well, so that no task of it can
            # start a process before (a shell's way: whichever comes first does it).
            with suppress(OSError):
                os.setpgid(process.pid, process.pid)
        self.processes[slot] = process
        self._spawned_at[slot] = time.monotonic()
        if process.pid and hasattr(os, "pidfd_open"):
            # Not yet reaped, so the pid is still this child's. Elsewhere: polled.
            with suppress(OSError):
                self._exit_fds[slot] = os.pidfd_open(process.pid)

    def exited(self) -> list[int]:
        """Wait a tick for children to exit; the slots of those that did."""
        fds = [fd for slot, fd in self._exit_fds.items() if slot in self.processes]
        if fds:
            multiprocessing.connection.wait(fds, timeout=_TICK_SECONDS)
        else:
            time.sleep(_TICK_SECONDS)  # wait() on nothing would return at once
        self._left_running.tick()
        # Reaped here (a non-blocking waitpid), not told by its sentinel: a pipe end the
        # child's forks may hold open after it exited.
        return [slot for slot, process in self.processes.items() if process.exitcode is not None]

    def ended(self, slot: int, *, replaced: bool) -> Ended:
        """Join the child of ``slot``, which exited or was killed, and clear its slot.

        If ``replaced`` (the worker serves on), what its task left running in its process
        group is ended now; otherwise when the worker stops (:meth:`end_left_running`).
        """
        process = self.processes.pop(slot)
        process.join()
        fd = self._exit_fds.pop(slot, None)
        if fd is not None:
            os.close(fd)
        self._killed.discard(process.pid or 0)
        if process.exitcode != 0:
            log.error(
                "child %d (pid %s) died with exit code %s", slot, process.pid, process.exitcode
            )
        reason = f"its worker process {process.pid} exited with code {process.exitcode}"
        stopped = self._stopping.pop(slot, None)
        task_id = self.slots[slot].task_id
        if process.pid and replaced:
            self._left_running.end_soon(process.pid, stopped[0] if stopped else task_id)
        elif process.pid:
            self._left_running.keep(process.pid)
        self.slots[slot].clear(holds=False)
        return Ended(reason, stopped, task_id)

    def replace(self, slot: int, *, had_task: bool) -> None:
        """Fork a new child for ``slot`` whose child ended, later if it keeps dying at start."""
        young = time.monotonic() - self._spawned_at.get(slot, 0.0) < _CRASH_LOOP_SECONDS
        if young and not had_task:
            # Dying right after start (a broken import, a bad environment): back off
            # instead of burning a core on respawns.
            delay = min(2 * self._backoff.get(slot, _CRASH_LOOP_SECONDS / 2), 30.0)
            self._backoff[slot] = delay
            self._respawn_at[slot] = time.monotonic() + delay
            log.error("child %d keeps dying at start; next try in %.1f s", slot, delay)
        else:
            self._backoff.pop(slot, None)
            self.spawn(slot)

    def respawn_due(self) -> None:
        """Fork the children whose backoff after dying at start is over."""
        now = time.monotonic()
        for slot, when in list(self._respawn_at.items()):
            if now >= when:
                del self._respawn_at[slot]
                self.spawn(slot)

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every child process."""
        for child in self.processes.values():
            if child.pid:
                os.kill(child.pid, signum)

    def kill_all(self) -> None:
        """SIGKILL every child process still alive (they are reaped by :meth:`ended`)."""
        for process in self.processes.values():
            if process.pid and process.is_alive():
                process.kill()

    def end_left_running(self) -> None:
        """End what the tasks of exited children left running; for a worker that stops."""
        self._left_running.end_all()

    def enforce_limits(self) -> None:
        """Kill children past their task's hard time limit or a terminate's grace period."""
        now = time.time()
        for slot, process in list(self.processes.items()):
            state = self.slots[slot]
            task_id, deadline = state.task_id, state.deadline
            stopping = self._stopping.get(slot)
            if stopping is not None and stopping[0] != task_id:
                del self._stopping[slot]  # that task ended by itself
                stopping = None
            # A task interrupted with a grace past its hard time limit is killed at that
            # limit all the same (a notebook's Stop leaves its cleanup the time it takes,
            # within the task's limits).
            limited = stopping is None or stopping[1] == "revoked"
            if stopping is not None and now >= stopping[2]:
                self._kill(slot, process, stopping)
            elif task_id and deadline and now >= deadline and limited:
                self._kill(slot, process, (task_id, "time_limit", now))

    def _kill(self, slot: int, process: BaseProcess, stopping: tuple[str, str, float]) -> None:
        if process.pid in self._killed:
            return  # already sent; waiting for it to be reaped
        self._killed.add(process.pid or 0)
        log.error(
            "killing child %d (pid %s): task %s %s",
            slot,
            process.pid,
            stopping[0],
            "passed its hard time limit"
            if stopping[1] == "time_limit"
            else "ignored its terminate request",
        )
        self._stopping[slot] = stopping
        if process.pid:
            os.kill(process.pid, signal.SIGKILL)

    def terminate(self, task_id: str, grace: float, signame: str = "SIGTERM") -> None:
        """Interrupt ``task_id`` where it runs; kill its child if still there after ``grace``.

        ``signame`` is the revoke's signal: ``SIGTERM`` or ``SIGINT`` interrupt the task
        (SIGINT to its child, a ``KeyboardInterrupt``), ``SIGKILL`` kills the child at once,
        any other is sent to the child as is but those it uses itself (``SIGTERM`` instead).
        """
        sent = getattr(signal, signame, None) if signame.startswith("SIG") else None
        if not isinstance(sent, signal.Signals) or signame in WORKER_OWN_SIGNALS:
            log.warning("terminate of task %s: SIGTERM, not %r", task_id, signame)
            sent = signal.SIGTERM
        if sent is signal.SIGTERM:
            sent = signal.SIGINT  # the child's interrupt: SIGTERM would stop it after the task
        # Remembered for a while: the request can overtake the delivery it is about (the
        # task is STARTED in Redis a moment before its child records it in its slot).
        forget_at = time.monotonic() + _TERMINATE_MEMORY_SECONDS
        self._terminates[task_id] = (forget_at, grace, sent)
        self.apply_terminates()

    def apply_terminates(self) -> None:
        """Interrupt the tasks of the terminate requests whose task a child now runs."""
        now = time.monotonic()
        for task_id, (forget_at, grace, sent) in list(self._terminates.items()):
            for slot, process in self.processes.items():
                if self.slots[slot].task_id == task_id and process.pid:
                    killed = sent is signal.SIGKILL
                    log.warning(
                        "terminating task %s in child %d (%s%s)",
                        task_id,
                        slot,
                        sent.name,
                        "" if killed else f", SIGKILL after {grace:.1f} s",
                    )
                    self._stopping[slot] = (task_id, "revoked", time.time() + grace)
                    if killed:  # (enforce_limits kills it no second time)
                        self._killed.add(process.pid)
                    os.kill(process.pid, sent)
                    del self._terminates[task_id]
                    break
            else:
                if now >= forget_at:
                    del self._terminates[task_id]
