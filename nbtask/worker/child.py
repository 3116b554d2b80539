"""A worker's child process.

It takes one message at a time and handles it in four steps: **admit** (verify it, check
that it may start: :mod:`~nbtask.worker.admit`), **run** (the task, under its limits,
streaming its output and progress: :mod:`~nbtask.worker.run`), **settle** (store the
outcome, tell the client, acknowledge) and **follow up** (linked tasks, a chain's next
step, the handlers: :mod:`~nbtask.worker.follow_ups`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

from nbtask._process import current_pid, die_with_parent
from nbtask.brokers import Delivery, Verdict, open_broker
from nbtask.core.datasets import DatasetCache, Loader
from nbtask.core.fingerprint import code_differs
from nbtask.core.outgoing import MessageBuilder
from nbtask.core.task import Task
from nbtask.errors import BrokerUnavailable, Ignore, NbtaskError, TaskPredicate
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer
from nbtask.wire.events import CODE_DIFFERS, FINAL_SEQ, Event, EventType, run_seq_base
from nbtask.wire.message import TaskMessage
from nbtask.wire.records import FOLLOW_UPS, FOLLOW_UPS_OWED
from nbtask.worker.admit import Admission, Admitted
from nbtask.worker.descriptors import DescriptorOutput
from nbtask.worker.finder import TaskFinder
from nbtask.worker.follow_ups import FollowUps, has_handlers, owes_follow_ups
from nbtask.worker.holdings import process_holding
from nbtask.worker.interrupts import TaskInterrupts
from nbtask.worker.journal import Journal
from nbtask.worker.outbox import Outbox, TaskStream
from nbtask.worker.predicates import Predicates
from nbtask.worker.run import Runner
from nbtask.worker.settle import Outcome, failure_event, outcome_fields, retry_requeue
from nbtask.worker.slots import SlotState
from nbtask.worker.subtasks import SubtaskPublisher

__all__ = ["Child"]

_NOTEBOOK_LOOK_SECONDS = 2.0  # how often an idle child asks whether a notebook uses it

log = logging.getLogger("nbtask.worker")


def _default_sigterm() -> None:
    with contextlib.suppress(ValueError):  # (only the main thread sets handlers)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Child:
    """The loop of one child process (created by the supervisor, run after fork)."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        secret: str | None,
        *,
        queues: Sequence[str],
        consumer: str,
        worker_id: str,
        hostname: str,
        tasks: Mapping[str, Task],
        slot: SlotState,
        datasets: Mapping[str, Loader] | None = None,
        replaces: bool = False,
        on_notebook: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.url = url
        self.secret = secret
        self.queues = list(queues)
        self.consumer = consumer
        self.worker_id = worker_id
        self.hostname = hostname
        self.tasks = TaskFinder(tasks, hostname)
        self.datasets = DatasetCache(datasets or {})
        self.replaces = replaces  # another child served this slot (and its own queue) before
        self.slot = slot
        self._claimed = ""  # the task id this child last wrote in its slot
        self._on_notebook = on_notebook  # called once, idle, when a notebook uses the worker
        self._next_notebook_look = 0.0
        self._stop = False
        self.interrupts = TaskInterrupts()
        self._whoami: dict[str, Any] = {"worker": hostname}
        self._told_code_differs: set[str] = set()  # task names, said once in the log

    def run(self) -> None:
        """Serve messages until SIGTERM (finishing the current task first)."""
        die_with_parent(signal.SIGKILL)
        # A process group of its own: Ctrl-C in a terminal reaches only the supervisor,
        # so SIGINT here always means "terminate the running task".
        os.setpgid(0, 0)
        self.interrupts.install()
        signal.signal(signal.SIGTERM, self._on_term)
        # A process a task forks is not this child: SIGTERM ends it, as any process (the
        # worker sends it to what tasks left running when it stops; multiprocessing's
        # terminate() sends it too).
        os.register_at_fork(after_in_child=_default_sigterm)
        self.transport = open_broker(self.settings, self.url)
        self.signer = Signer.for_settings(self.settings, self.secret)
        self.outbox = Outbox(self.transport, self.signer)
        self.descriptors = DescriptorOutput(self.outbox, (sys.stdout, sys.stderr))
        self.publisher = SubtaskPublisher(
            self.transport, MessageBuilder(self.signer, self.settings, self.transport.store)
        )
        # Chain steps and callbacks: never placed through an imported module's app.
        steps = MessageBuilder(self.signer, self.settings, self.transport.store, through_apps=False)
        self.follow_ups = FollowUps(
            self.transport, self.signer, SubtaskPublisher(self.transport, steps)
        )
        self.admission = Admission(
            self.settings,
            self.transport,
            self.signer,
            self.follow_ups,
            self._settle,
            hostname=self.hostname,
            consumer=self.consumer,
            worker_id=self.worker_id,
            handled=self._handled,
        )
        self.predicates = Predicates(self.transport, self.settings, self.signer)
        self.holding, self.served = process_holding(
            self.settings,
            self.transport.store,
            self.consumer,
            self.queues,
            self.datasets,
            replaces=self.replaces,
        )
        self.runner = Runner(
            self.settings,
            self.transport,
            self.signer,
            outbox=self.outbox,
            descriptors=self.descriptors,
            publisher=self.publisher,
            follow_ups=self.follow_ups,
            holding=self.holding,
            datasets=self.datasets,
            interrupts=self.interrupts,
            slot=self.slot,
            hostname=self.hostname,
            whoami=self._whoami,
            exit_if_forked=self._exit_if_forked,
        )
        self._pid = os.getpid()
        self._whoami["pid"] = self._pid
        # For the child's whole life: a task's text goes to its client, anything else to
        # the worker's log, and text from threads a task left behind to no other task.
        self.journal = Journal(self.transport.store)
        logging.getLogger("nbtask").addHandler(self.journal)
        out, err = EventType.STDOUT, EventType.STDERR
        sys.stdout = TaskStream(self.outbox, out, sys.stdout, self.journal, self.descriptors)
        sys.stderr = TaskStream(self.outbox, err, sys.stderr, self.journal, self.descriptors)
        self._serve()
        # Kept values' store copies still being written: the only copy once this ends.
        self.transport.store.finish_writes()
        # Closed, not left to the exit: RabbitMQ gives back a message it pushed here and
        # this process never started (the next one, on acknowledging the last) before it
        # confirms the close; a dropped socket it notices later, maybe after the
        # supervisor moved what waits on this process's own queue and dropped it.
        self.transport.close()

    def _serve(self) -> None:
        backoff = 0.1
        delivery: Delivery | None = None
        # A message already taken is always handled, even once asked to stop.
        while not self._stop or delivery is not None:
            self._exit_if_forked(0)
            try:
                if delivery is None:
                    delivery = self.transport.fetch(self.served(), self.consumer, 1.0)
                backoff = 0.1
                if delivery is not None:
                    # Handled exactly once, whatever happens: handle() may return the
                    # next message, taken with its last write (one round trip).
                    taken, delivery = delivery, None
                    delivery = self.handle(taken)
                if delivery is None:  # nothing came (or nothing was asked for) meanwhile
                    self._notebook_seen()
            except BrokerUnavailable as exc:
                log.warning("broker unreachable (%s); retrying in %.1f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                # Never lose the worker slot to one bad message: log and carry on.
                log.exception("unexpected error while handling a message; continuing")

    def _notebook_seen(self) -> None:
        """Between messages: once a notebook session uses this worker, call ``on_notebook``.

        Once; the store is asked at most every ``_NOTEBOOK_LOOK_SECONDS``, and only after
        the child looked for work (a replacement first takes what waits on its queue).
        """
        if self._on_notebook is None or self._stop or time.monotonic() < self._next_notebook_look:
            return
        self._next_notebook_look = time.monotonic() + _NOTEBOOK_LOOK_SECONDS
        modules = self.transport.store.notebook_modules()
        if modules is None:
            return
        ready, self._on_notebook = self._on_notebook, None
        try:
            ready(modules)
        except Exception:  # the first cell does the same work again, and says what failed
            log.exception("could not make ready for notebook cells")

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    # One delivery ----------------------------------------------------------------------------
    def handle(self, delivery: Delivery) -> Delivery | None:
        """Admit, run, settle and follow up one delivery; return the next, if it came along."""
        # The task is STARTED from the moment it was delivered: claim the slot now, so a
        # terminate request finds this child even before the task begins to run.
        self.interrupts.begin()
        if delivery.verdict == Verdict.OK and delivery.task_id:
            self._claim(delivery.task_id)
        self.journal.about(delivery.task_id or "")
        try:
            admitted = self.admission.admit(delivery)
            if admitted is None:
                return None
            if admitted.message.id != delivery.task_id:  # (the same, when one came beside)
                self.journal.about(admitted.message.id)
            try:
                return self._run_admitted(admitted)
            except BrokerUnavailable:
                raise
            except Exception as exc:
                # A failure while reporting (an exception whose str() raises, an outcome
                # that cannot be sent): the task must still end, and say why.
                log.exception("could not settle task %s; reporting it failed", delivery.task_id)
                return self._settle_unreported(admitted, exc)
        finally:
            self.journal.about("")
            self._release()

    def _claim(self, task_id: str) -> None:
        """Show the supervisor that this child runs ``task_id`` (it has no time limit yet).

        Written once per task: the slot is memory shared with the supervisor, which only
        reads it while this child lives.
        """
        if task_id != self._claimed:
            self.slot.occupy(task_id, 0.0)
            self._claimed = task_id

    def _release(self) -> None:
        """Show the supervisor that this child runs no task now."""
        self.slot.clear(holds=self.holding.ever_held)
        self._claimed = ""

    def _settle_unreported(self, admitted: Admitted, exc: Exception) -> Delivery | None:
        # (The next message, if a refused earlier write took it: handled, never dropped.)
        why = NbtaskError(
            f"the task ended but nbtask could not report its outcome "
            f"({type(exc).__name__}); the worker's log has the details"
        )
        message = admitted.message
        event = failure_event(message.id, FINAL_SEQ, why, self._whoami, run=message.run)
        return self._settle(admitted, Outcome(event))

    def _exit_if_forked(self, code: int) -> None:
        """End a process that task code forked from this child: only the child reports.

        The copy must not report an outcome or take messages: it has no supervisor.
        """
        if current_pid() != self._pid:
            os._exit(code)

    # Run ---------------------------------------------------------------------------------------
    def _run_admitted(self, admitted: Admitted) -> Delivery | None:
        message = admitted.message
        try:
            task: Task | None = self.tasks.find(message, admitted.code)
            resolve_error: BaseException | None = None
        except Exception as exc:
            task, resolve_error = None, exc
        if task is not None and self.admission.rate_limited(admitted, task):
            return None
        first_seq = run_seq_base(message.retries, admitted.delivery.deliveries)
        self._whoami["started_at"] = time.time()  # in every event of this run, final ones too
        self._note_code_differs(message, task)
        self.outbox.begin(
            message.id,
            message.client,
            self._whoami,
            first_seq=first_seq,
            run=message.run,
            started_after=task.started_after if task is not None else None,
        )
        self._claim(message.id)
        if task is None:
            assert resolve_error is not None
            outcome = self.runner.failed(message, resolve_error, self.outbox.end())
        elif self.interrupts.terminated:
            reason = {"reason": "terminated"}
            seq = self.outbox.end()
            outcome = Outcome(Event(EventType.REVOKED, message.id, seq, reason, run=message.run))
        else:
            outcome = self.runner.run(admitted, task)
        if isinstance(outcome.exc, TaskPredicate):  # Reject, Ignore: no handlers (Celery's)
            task = None
            if isinstance(outcome.exc, Ignore):  # no final event will say the run began
                self.outbox.send_skipped_start()
            if self.predicates.set_aside(admitted, outcome):
                return None
        # Callbacks, handlers, freeing argument blobs and writing kept values' store copies
        # come after the outcome is stored; only without them may the last write also wait
        # for the next message.
        store = self.transport.store
        handlers = task is not None and has_handlers(task)
        later = handlers or bool(admitted.callbacks or message.args_layout)
        # Callbacks, errbacks or a chain's later steps: the message is held until they are
        # sent (see owes_follow_ups), so that a process killed meanwhile does not lose them.
        owed = owes_follow_ups(message, outcome, admitted.callbacks)
        try:
            following = self._settle(
                admitted,
                outcome,
                ack=not owed,
                owes=owed,
                fetch_next=not later and not store.holds_writes(),
            )
        finally:
            store.start_writes()
        try:
            # (None: looked for, it has no handlers of its own.)
            handled = task if handlers else None
            self.follow_ups.run(message, outcome, admitted.callbacks, handled, owed=owed)
        finally:
            if owed:  # (never left held: RabbitMQ would give this process nothing more)
                self.transport.discard(admitted.delivery)
        return following

    def _handled(self, admitted: Admitted, outcome: Outcome) -> Task | None:
        """The task whose handlers run for ``outcome``, which its killed process never ran.

        A hard time limit's (see ``FollowUps.run_owed``), with its run's arguments and
        request set on ``outcome``. ``None`` if it has no handlers, or its code or
        arguments do not load here (said in the log: its follow-ups are still run).
        """
        message = admitted.message
        try:
            task = self.tasks.find(message, admitted.code)
            if not has_handlers(task):
                return None
            args, kwargs = self.runner.arguments(admitted)
        except Exception:
            log.exception("could not load task %s to run its handlers", message.id)
            return None
        outcome.args, outcome.kwargs = tuple(args), kwargs
        outcome.request = self.runner.request(admitted, task, args, kwargs)
        return task

    def _note_code_differs(self, message: TaskMessage, task: Task | None) -> None:
        """Say in this run's events (and once in the log) that the sender's code differs.

        The task still runs, on this process's code: its client warns its user.
        """
        if task is None or not code_differs(message.fingerprint, task):
            self._whoami.pop(CODE_DIFFERS, None)
            return
        self._whoami[CODE_DIFFERS] = True
        if message.name not in self._told_code_differs:
            self._told_code_differs.add(message.name)
            log.warning(
                "task %s: this worker's code differs from its sender's (edited since this "
                "worker imported it?); it runs this worker's: restart the worker to run the "
                "sender's",
                message.name,
            )

    # Settle ------------------------------------------------------------------------------------
    def _settle(
        self,
        admitted: Admitted,
        outcome: Outcome,
        *,
        ack: bool = True,
        owes: bool = False,
        fetch_next: bool = False,
    ) -> Delivery | None:
        """Store the outcome, tell the client and acknowledge (re-sending a retry).

        With ``owes`` the record says the outcome's follow-ups are owed (see
        ``FollowUps.run_owed``). With ``fetch_next`` (and unless the child is stopping) the
        same round trip also waits for the next message.
        """
        message = admitted.message
        try:
            raw = self.signer.seal(outcome.event.to_header(), outcome.body)
        except NbtaskError as exc:
            seq = outcome.event.seq
            outcome.event = failure_event(message.id, seq, exc, run=message.run)
            outcome.body = b""
            raw = self.signer.seal(outcome.event.to_header())
        fields = outcome_fields(self.signer, message, outcome, raw)
        if owes:
            fields[FOLLOW_UPS] = FOLLOW_UPS_OWED
        # Sent again below (after a lost reply, too), a retry is parked once: its record
        # names its number (see outcome_fields).
        requeue = retry_requeue(self.signer, message, outcome, admitted.envelope.body)
        then_fetch = (self.served(), self.consumer, 1.0) if fetch_next and not self._stop else None
        if then_fetch is not None:
            # The write also waits (up to a second) for the next message: meanwhile this
            # child runs nothing. A slot still naming the task would have the supervisor
            # take the loss of its next run (a retry due at once, run by another child) for
            # a copy of a running task's message, and drop it: the task left STARTED.
            self._release()
        delivery = admitted.delivery if ack else None
        backoff = 0.1
        while True:
            # The task has run: its outcome is written, however long the broker is away
            # (giving up would leave the message to be settled as if the worker died).
            try:
                return self.transport.finish(
                    delivery,
                    message.id,
                    message.client,
                    raw,
                    fields,
                    requeue=requeue,
                    requeue_queue=outcome.retry_queue or "",
                    then_fetch=then_fetch,
                )
            except BrokerUnavailable as exc:
                log.warning(
                    "cannot store the outcome of task %s yet (%s); retrying in %.1f s",
                    message.id,
                    exc,
                    backoff,
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                then_fetch = None
