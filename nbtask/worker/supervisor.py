"""``nbtask worker``: a supervisor process and its child processes.

The supervisor runs no task code. It forks one child per slot (each takes one message at
a time, so prefetch equals free slots), restarts a child that dies and settles the task it
held (redelivered if ``acks_late``, else ``WORKER_LOST``), renews the leases of running
tasks at every heartbeat, moves due ETA messages onto their queues, and cleans up after
other workers whose heartbeat lapsed (those whose messages it can verify).

The processes themselves (forking, replacing, killing one past a hard time limit or a
terminate's grace) are :mod:`nbtask.worker.pool`'s; this module is the supervisor's loop,
its housekeeping, and what it tells the broker.

Signals: the first SIGTERM/SIGINT is a warm shutdown (children finish their current task),
the second a cold one (children are killed; their tasks are settled as if they died).
Either way, what the tasks left running in the children's process groups is ended last;
that of a child killed or replaced while the worker serves on is ended at once (see
:mod:`nbtask.worker.left_running`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

from nbtask._process import start_ticks, this_place
from nbtask._text import redact_url
from nbtask.brokers import Transport, broker_kind, open_broker
from nbtask.core.datasets import Loader, data_queue
from nbtask.core.holding import holder_queue
from nbtask.core.task import Task
from nbtask.errors import BrokerUnavailable, NbtaskError
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer
from nbtask.wire.records import WorkerInfo
from nbtask.wire.versions import probe_result, start_probe
from nbtask.worker.child import Child
from nbtask.worker.dead_workers import DeadWorkers
from nbtask.worker.lost import LostTasks
from nbtask.worker.mixed_brokers import say_if_brokers_mixed
from nbtask.worker.pool import ChildPool
from nbtask.worker.slots import SlotState

__all__ = ["EXIT_OK", "EXIT_SIGNAL", "Worker"]

log = logging.getLogger("nbtask.worker")

EXIT_OK = 0
EXIT_SIGNAL = 130  # stopped by a second (cold) signal
_STALE_CHECK_EVERY = 10  # heartbeats between visibility-timeout sweeps
# How long a stopping worker waits for the broker to see its children's connections end
# (RabbitMQ gives back their deliveries then) before it leaves their own queues as they are.
_CHILDREN_GONE_SECONDS = 5.0
# How long a stopping worker waits for each answer the broker owes it.
_BROKER_ANSWER_SECONDS = 5.0


class Worker:
    """A supervisor with ``concurrency`` child processes serving ``queues``.

    Parameters
    ----------
    settings
        Key prefix, heartbeat interval, visibility timeout, redelivery cap.
    url
        Broker URL.
    secret
        Signing secret (``None`` only with ``settings.insecure``).
    queues
        Queues to serve, in priority order.
    concurrency
        Child processes; default one per CPU core.
    tasks
        Registered tasks (from ``-A module``); tasks sent by value need no registration.
    parent_pid
        Stop (cold) when this process is gone: used by the embedded cluster.
    on_notebook
        Called in each child, idle, once a notebook session uses these workers, with the
        modules its settings need (``nbtask.notebook.warmup.warm``: the child makes
        ready for cells).
    """

    def __init__(
        self,
        settings: Settings,
        url: str,
        secret: str | None,
        *,
        queues: Sequence[str] = (),
        concurrency: int | None = None,
        tasks: Mapping[str, Task] | None = None,
        datasets: Mapping[str, Loader] | None = None,
        parent_pid: int | None = None,
        on_ready: Callable[[Worker], None] | None = None,
        on_notebook: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.url = url
        self.broker = broker_kind(url)
        self.secret = secret
        self.datasets = dict(datasets or {})
        # The holders of a dataset also serve its queue: tasks that require it go there.
        own = list(queues) or [settings.default_queue]
        #: The queues every child serves.
        self.shared_queues = own + [data_queue(name) for name in sorted(self.datasets)]
        self.concurrency = concurrency or settings.worker_concurrency or os.cpu_count() or 1
        self.tasks = dict(tasks or {})
        self.parent_pid = parent_pid
        self._place = this_place()
        self.hostname = self._place.hostname
        self.worker_id = f"{self.hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.consumers = [f"{self.worker_id}-{slot}" for slot in range(self.concurrency)]
        # Each child also serves a queue of its own: work on the values it holds goes there.
        self.queues = self.shared_queues + [holder_queue(c) for c in self.consumers]
        self._on_ready = on_ready
        self._on_notebook = on_notebook
        self._pool = ChildPool(self.concurrency, self._new_child)
        self._control_position = "$"
        self._signals = 0
        self._warm = False
        self._stopping, self._stopping_bounded = contextlib.ExitStack(), False  # _answer_soon
        self._failing: dict[str, str] = {}  # housekeeping step -> its last error
        # Ended tasks are remembered a little past max_age: a message older is refused.
        self._replays_after = settings.replay_window + 60.0
        self._started = time.time()
        self._start_ticks = start_ticks(os.getpid()) or 0
        self._versions_probe: subprocess.Popen[bytes] | None = None
        self._versions: dict[str, str] | None = None  # found, not yet announced
        self._announced: tuple[tuple[int, ...], tuple[str, ...]] = ((), ())

    # Running ---------------------------------------------------------------------------------
    def connect(self) -> None:
        """Reach the broker and declare the queues (:meth:`run` does it if not done).

        Raises
        ------
        BrokerUnavailable
            Nothing answers at the URL, or what answers is not the broker it names.
        """
        self.transport: Transport = open_broker(self.settings, self.url)
        self.store = self.transport.store
        self.transport.ping()
        self.signer = Signer.for_settings(self.settings, self.secret)
        self.lost = LostTasks(self.transport, self.signer, self.settings, self._running_now)
        self.dead = DeadWorkers(
            self.worker_id,
            self.transport,
            self.signer,
            self.lost,
            self.settings.visibility_timeout,
            self.settings.heartbeat_interval,
        )
        self.transport.ensure_queues(self.queues)
        # Said, not refused: the registry is unsigned (an entry anyone with write access
        # planted would keep every worker of the prefix from starting), and a worker of
        # the other broker just stopped stays listed for a few heartbeats.
        live = self.store.workers()
        say_if_brokers_mixed(self.broker, self.settings.key_prefix, live, self.worker_id)

    def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        if not hasattr(self, "transport"):  # the caller did not connect first
            self.connect()
        # Handlers only count signals; the loop below decides what to do.
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # Fix the control stream position before any child can take a task, so a
        # terminate sent from now on is never missed.
        self._read_control()
        self._heartbeat()
        for slot in range(self.concurrency):
            self._pool.spawn(slot)
        # Found by a child process: it takes CPU and memory this one should not keep.
        self._versions_probe = start_probe()
        log.info("worker %s ready", self.worker_id)
        if self._on_ready is not None:
            self._on_ready(self)
        try:
            return self._loop()
        finally:
            self._shutdown()

    def banner(self) -> str:
        """The startup banner: broker, queues, concurrency and registered tasks."""
        names = (
            "\n".join(f"  . {name}" for name in sorted(self.tasks))
            or "  (none: tasks sent by value only)"
        )
        processes = "process" if self.concurrency == 1 else "processes"
        return (
            f"nbtask worker {self.worker_id}\n"
            f"  broker:      {redact_url(self.url)}\n"
            f"  queues:      {', '.join(self.shared_queues)} (and one per child process)\n"
            f"  concurrency: {self.concurrency} child {processes}\n"
            f"[tasks]\n{names}"
        )

    def _loop(self) -> int:
        next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
        beats = 0
        while True:
            code = self._watch_signals_and_parent()
            if code is not None:
                return code
            self._reap_children()
            if self._warm and not self._pool.processes:
                return EXIT_OK
            if not self._warm:
                self._pool.respawn_due()
            try:
                beat = time.monotonic() >= next_heartbeat
                self._housekeeping(beat=beat, beats=beats)
                if beat:
                    next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
                    beats += 1
            except BrokerUnavailable as exc:
                log.warning("broker unreachable (%s); retrying", exc)
                time.sleep(min(1.0, self.settings.heartbeat_interval))

    def _watch_signals_and_parent(self) -> int | None:
        """The exit code if the worker must stop now; a first signal starts a warm stop."""
        if self._signals >= 2:
            log.warning("cold shutdown: killing %d child process(es)", len(self._pool.processes))
            return EXIT_SIGNAL
        if self._signals == 1 and not self._warm:
            self._warm = True
            log.info("warm shutdown: children finish their current task (signal again to stop now)")
            self._answer_soon()
            self._pool.signal_all(signal.SIGTERM)
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %d is gone; stopping", self.parent_pid)
            return EXIT_OK
        return None

    def _reap_children(self) -> None:
        """Wait a tick for children to exit; settle and replace those that did."""
        for slot in self._pool.exited():
            self._child_exited(slot, respawn=not self._warm)

    def _housekeeping(self, *, beat: bool, beats: int) -> None:
        """Every tick: limits, ETA, control, announcements; each beat: presence, dead workers.

        Each step runs on its own: one that fails (a key nbtask did not write, a
        read-only replica) is logged and the others still run, so no bad entry can stop
        heartbeats or time limits.
        """
        steps: list[tuple[str, Callable[[], object]]] = [
            # First: a broker that fails a step ends the tick, and this one needs none.
            ("time limits", self._pool.enforce_limits),
        ]
        if beat:
            # Next: stopping, a step given up on just before (a blip) makes the others
            # fail at once for a while; the heartbeat has a bounded wait of its own.
            steps.append(("heartbeat", self._heartbeat))
        steps += [
            ("versions", self._announce_versions),
            ("control messages", self._read_control),
            ("terminate requests", self._pool.apply_terminates),
        ]
        # After the heartbeat, which announces them too: one write, not two.
        steps.append(("announcements", self._announce_changes))
        steps.append(("countdowns", lambda: self.transport.move_due(self.queues)))
        if beat:
            steps += [
                ("dead workers", self.dead.reclaim),
                ("lost deliveries", self._settle_orphans),
                ("ended tasks", lambda: self.store.forget_ended_before(self._replays_after)),
            ]
        if beat and (beats + 1) % _STALE_CHECK_EVERY == 0:  # heartbeat number beats + 1
            steps.append(("expired leases", self._settle_stale))
        for name, step in steps:
            self._run_step(name, step)

    def _run_step(self, name: str, step: Callable[[], object]) -> None:
        try:
            step()
        except BrokerUnavailable:
            raise
        except Exception as exc:
            # Logged when a step starts failing or fails differently, not every tick.
            if self._failing.get(name) != repr(exc):
                log.exception("housekeeping step %r failed; the others go on", name)
            self._failing[name] = repr(exc)
        else:
            if self._failing.pop(name, None) is not None:
                log.info("housekeeping step %r works again", name)

    def _running_now(self) -> set[str] | None:
        """The tasks this worker's children run, and those other live workers announced.

        ``None`` when a live worker's registry entry cannot be read (nbtask did not write
        it): what that worker runs is unknown.
        """
        here = {slot.task_id for slot in self._pool.slots if slot.task_id}
        live = self.store.workers_if_known()
        if live is None:
            return None
        return here.union(*(info.busy for worker, info in live.items() if worker != self.worker_id))

    def _settle_orphans(self) -> None:
        for delivery in self.transport.orphans(self.queues):
            self.lost.settle(delivery, "its worker process died (redelivered by the broker)")

    def _settle_stale(self) -> None:
        timeout = self.settings.visibility_timeout
        why = f"its worker stopped answering for over {timeout:g} s, the visibility timeout"
        for delivery in self.transport.stale(self.queues, self.worker_id):
            self.lost.settle(delivery, f"{why}: it died, or was paused or cut off")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1

    def _new_child(self, slot: int, state: SlotState, replaces: bool) -> Child:
        """The child to run in ``slot``: its own queue first, then the shared ones."""
        return Child(
            self.settings,
            self.url,
            self.secret,
            queues=[holder_queue(self.consumers[slot]), *self.shared_queues],
            consumer=self.consumers[slot],
            worker_id=self.worker_id,
            hostname=self.hostname,
            tasks=self.tasks,
            datasets=self.datasets,
            slot=state,
            replaces=replaces,
            on_notebook=self._on_notebook,
        )

    def _child_exited(self, slot: int, *, respawn: bool) -> None:
        """Settle what the child of ``slot`` held, and replace it if ``respawn``."""
        reason, stopped, ran = self._pool.ended(slot, replaced=respawn)
        had_task = bool(ran)
        try:
            self.store.forget_holdings([self.consumers[slot]])  # its memory is gone
            lost = self.transport.held(self.queues, self.consumers[slot])
            for delivery in lost:
                self.lost.settle(delivery, reason, stopped, ran=ran, aside=self.worker_id)
            had_task = had_task or bool(lost)
            if stopped is not None and not any(d.task_id == stopped[0] for d in lost):
                # A broker that gives a dead child's message back by itself (AMQP) may
                # not show it yet: store why it was killed now, so that the copy coming
                # back finds the task final and is dropped.
                self.lost.report_stopped(stopped, reason)
        except BrokerUnavailable as exc:
            log.warning("could not settle the tasks of child %d yet: %s", slot, exc)
        if respawn:
            self._pool.replace(slot, had_task=had_task)

    def _shutdown(self) -> None:
        if self._versions_probe is not None:
            self._versions_probe.kill()
            self._versions_probe.wait()
        self._pool.kill_all()
        with self._stopping:
            self._answer_soon()
            for slot in list(self._pool.processes):
                self._child_exited(slot, respawn=False)
            # Before the broker is told: what tasks left may hold a copy of a connection.
            self._pool.end_left_running()
            self._say_goodbye()
        self.transport.close()
        log.info("worker %s stopped", self.worker_id)

    def _answer_soon(self) -> None:
        """Bound the waits for the broker's answers from now on (a stop), once.

        A broker that takes what is sent but says nothing back then costs one bounded
        wait, not a timeout per step (see ``Transport.answers_within``).
        """
        if not self._stopping_bounded:
            self._stopping.enter_context(self.transport.answers_within(_BROKER_ANSWER_SECONDS))
            self._stopping_bounded = True

    def _say_goodbye(self) -> None:
        """Move what waits on the children's queues, unregister (the children have ended)."""
        left = [holder_queue(consumer) for consumer in self.consumers]
        try:
            left = self.dead.rehome(self.consumers, until=time.monotonic() + _CHILDREN_GONE_SECONDS)
        except BrokerUnavailable as exc:
            log.warning("could not move what waits on this worker's processes: %s", exc)
        try:
            self.store.forget_holdings(self.consumers)
            if left:
                # Left to the next worker that cleans up after dead ones: it looks again
                # until the broker lets it delete them (see DeadWorkers.reclaim). Pid 0:
                # stopped, though this process may run on (a worker run in a program).
                with contextlib.suppress(BrokerUnavailable):  # shown stopped all the same
                    self.store.heartbeat(self.worker_id, dataclasses.replace(self._info(), pid=0))
                self.store.end_heartbeat(self.worker_id)
                log.warning("left queue(s) %s to another worker's clean-up", ", ".join(left))
            else:
                self.store.unregister(self.worker_id)
                self.transport.forget_consumers(self.consumers, self.queues)
        except BrokerUnavailable as exc:
            log.warning("could not unregister from the broker: %s", exc)

    # Housekeeping ----------------------------------------------------------------------------
    def _info(self) -> WorkerInfo:
        running = tuple(slot.task_id for slot in self._pool.slots)
        return WorkerInfo(
            hostname=self.hostname,
            pid=os.getpid(),
            queues=tuple(self.queues),
            concurrency=self.concurrency,
            consumers=tuple(self.consumers),
            started=self._started,
            tasks=tuple(sorted(self.tasks)),
            datasets=tuple(sorted(self.datasets)),
            busy=tuple(task_id for task_id in running if task_id),
            running=running,
            seen=time.time(),
            keys=self.signer.accepted_key_ids,
            pids=self._pool.pids(),
            broker=self.broker,
            boot=self._place.boot,
            pid_space=self._place.pid_space,
            start_ticks=self._start_ticks,
        )

    def _announce_versions(self) -> None:
        """Tell clients the package versions found at the start, once they are found."""
        if self._versions_probe is not None:
            self._versions = probe_result(self._versions_probe)
            if self._versions is not None:
                self._versions_probe = None
        if self._versions is not None:
            self.store.announce_versions(self.worker_id, self._versions)
            self._versions = None

    def _heartbeat(self) -> None:
        """Say this worker is alive, and renew its children's leases.

        Stopping, in a bounded wait of its own: tried even while the stop's other steps
        fail at once after an answer was given up on (see :meth:`_answer_soon`), so a
        broker back from a blip hears it at once, not once that pause is over.
        """
        own: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self._stopping_bounded:
            own = self.transport.answers_within(_BROKER_ANSWER_SECONDS)
        with own:
            self._announce()
            self.transport.renew(self.consumers, self.queues)

    def _announce(self) -> None:
        self._announced = self._placement_facts()
        self.store.heartbeat(self.worker_id, self._info())

    def _placement_facts(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The children's pids, and the task each child that held a kept value runs."""
        slots = self._pool.slots
        return self._pool.pids(), tuple(slot.task_id if slot.holds else "" for slot in slots)

    def _announce_changes(self) -> None:
        """Announce at once a new child, and a task started or ended by one holding values.

        Work on a kept value goes to the process holding it (told by its pid) unless that
        one is busy and another idle (:mod:`nbtask.core.placement`), and a heartbeat's
        word on that can be a whole interval old. Only children that held a value are
        watched: a worker whose children hold none writes nothing per task.
        """
        if self._placement_facts() != self._announced:
            self._announce()

    def _read_control(self) -> None:
        for entry_id, raw in self.store.read_control(self._control_position):
            self._control_position = entry_id
            if not raw:
                continue
            try:
                command = self.signer.open(raw).header
            except NbtaskError as exc:
                log.error("ignored a control message that does not verify: %s", exc)
                continue
            if command.get("kind") == "control" and command.get("cmd") == "terminate":
                grace, signame = float(command.get("grace", 5.0)), command.get("signal")
                self._pool.terminate(str(command.get("id")), grace, str(signame or "SIGTERM"))
