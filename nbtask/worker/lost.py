"""Tasks whose runner died: redelivered, reported lost, reported stopped, or moved.

The supervisor settles a delivery whose child died (or that a dead worker held, or whose
lease lapsed) here, and reports a task it killed on purpose (time limit, terminate). Each
such final outcome is followed as a task's own failure is: its errbacks are sent and its
chain's later steps fail with it (see ``FollowUps.run_owed``), unless its message is older
than ``max_age``: such a delivery may be a replay made to look lost, so nothing it carries
is acted on (as a worker refusing it as too old does). A task killed past its hard time
limit has its message put back on its queue instead: the child that takes it runs its
follow-ups and its class's handlers, which this process (running no task code) cannot.
It also moves the messages still waiting on a gone process's own queue (a cell sent to the
process holding its kept values) to the queue they name for that case, and parks the ones
parked for it until their due time (a countdown, a retry's) for that queue, due as they were:
only the gone process's supervisor moved what was due there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection

from nbtask.brokers import Delivery, Transport
from nbtask.core.outgoing import MessageBuilder
from nbtask.errors import BrokerUnavailable, NbtaskError
from nbtask.settings import Settings
from nbtask.wire.envelope import Envelope, Signer
from nbtask.wire.events import FINAL_SEQ, WAITING_STATES, Event, EventType, State
from nbtask.wire.message import TaskMessage
from nbtask.worker.admit import message_age
from nbtask.worker.follow_ups import FollowUps
from nbtask.worker.settle import (
    failure_event,
    report,
    send_stored_outcome,
    stopped_event,
)
from nbtask.worker.subtasks import SubtaskPublisher

__all__ = ["LostTasks"]

log = logging.getLogger("nbtask.worker")

_REHOME_RETRY_SECONDS = 0.1  # between tries to delete a gone process's queue
#: Messages waiting on a gone process's queue, and messages parked for it, that one look
#: moves elsewhere at most, each: a planted queue or set of millions must not hold up the
#: heartbeat of the worker cleaning up (the queue counts as left meanwhile, and is looked
#: at again, as ``RECLAIM_PER_BEAT`` does).
MOVED_PER_LOOK = 100
_TOO_OLD_TO_FOLLOW_UP = (
    "its message is older than max_age and may be a replay: its errbacks are not sent, "
    "nor its chain's later steps ended"
)


class LostTasks:
    """Settles the tasks of dead children and dead workers.

    Parameters
    ----------
    transport, signer
        Where outcomes are stored and sent, and how messages are verified.
    settings
        ``max_redeliveries``.
    running
        The ids of the tasks live worker processes run now (none known by default);
        ``None`` when that is unknown (a live worker's registry entry cannot be read).
    """

    def __init__(
        self,
        transport: Transport,
        signer: Signer,
        settings: Settings,
        running: Callable[[], Collection[str] | None] = tuple,
    ) -> None:
        self.transport = transport
        self.store = transport.store
        self.signer = signer
        self.settings = settings
        self.running = running
        # Tasks whose deliveries were left for an unreadable live registry entry, said once
        # each: they are looked at again at every sweep while it is there.
        self._left_unknown: set[str] = set()
        builder = MessageBuilder(signer, settings, transport.store, through_apps=False)
        self.follow_ups = FollowUps(transport, signer, SubtaskPublisher(transport, builder))

    def settle(
        self,
        delivery: Delivery,
        reason: str,
        stopped: tuple[str, str, float] | None = None,
        *,
        ran: str = "",
        aside: str = "",
    ) -> None:
        """Settle a delivery whose worker died: redeliver (acks_late) or report it lost.

        ``stopped`` names a task this supervisor killed on purpose (time limit, revoke):
        that one is reported as such, never redelivered. ``aside`` is given for a loss
        seen just now (a child of this worker died; ``ran``: the task its slot named): a
        delivery whose task a live process is said to run is then held by ``aside``, a
        consumer whose lease nobody renews, to be looked at again (see
        :meth:`_live_process_may_run`).
        """
        try:
            envelope = self.signer.open(delivery.raw)
            message = TaskMessage.from_header(envelope.header)
        except NbtaskError as exc:
            log.error("dead-lettered an unverifiable message %s: %s", delivery.delivery_id, exc)
            self.transport.dead_letter(delivery)
            return
        self._settle_verified(delivery, envelope, message, reason, stopped, ran=ran, aside=aside)

    def _settle_verified(
        self,
        delivery: Delivery,
        envelope: Envelope,
        message: TaskMessage,
        reason: str,
        stopped: tuple[str, str, float] | None = None,
        *,
        ran: str = "",
        aside: str = "",
    ) -> None:
        record = self.store.get_record(message.id)
        # Past max_age the delivery may be a replay made to look lost: the task's own
        # outcome is still settled, but nothing the message carries is acted on.
        follow_up = message_age(message) <= self.settings.replay_window
        if record is not None and (record.final or record.result is not None):
            # It finished (its signed outcome says so, whatever the plain state field
            # says): the acknowledgement was lost, and maybe the outcome's event. Or its
            # supervisor stated how it ended without its message (report_stopped): its
            # follow-ups are owed, and run here.
            self.transport.discard(delivery)
            send_stored_outcome(self.transport, message.client, record)
            if follow_up:
                self._follow_up(message, envelope)
            return
        # The dead child ran this very task (its slot named it): its delivery is the
        # task's latest run, whatever a live worker announced before (an earlier run's).
        if message.id != ran and self._live_process_may_run(delivery, message, reason, aside):
            return
        if not follow_up and (record is None or record.state in WAITING_STATES):
            # Never started (this run), as a worker taking it now would refuse it: too old.
            self._refuse_too_old(delivery, envelope, message)
            return
        if stopped is not None and stopped[0] == message.id:
            event = stopped_event(stopped, reason, message.name, message.run)
            if follow_up and event.type is EventType.FAILURE:
                self._past_time_limit(message, event, delivery)
            else:
                self._report(message, envelope, event, delivery, follow_up=follow_up)
            return
        redeliver = message.acks_late and message.reject_on_worker_lost is not False
        if redeliver and delivery.deliveries < self.settings.max_redeliveries:
            attempt = delivery.deliveries + 2
            self.note(message, f"{reason}; redelivering (attempt {attempt})", logging.WARNING)
            self.transport.requeue(delivery, message.id)
            return
        if redeliver:
            evalue = (
                f"redelivered {delivery.deliveries} time(s) and its worker died each time; "
                "moved to the dead-letter stream"
            )
            data = {"ename": "WorkerLost", "reason": reason, "evalue": evalue}
            event = Event(EventType.FAILURE, message.id, FINAL_SEQ, data, run=message.run)
            self.transport.dead_letter(delivery)
            self._report(message, envelope, event, follow_up=follow_up)
            return
        self.note(message, f"{reason}; reported WORKER_LOST", logging.ERROR)
        if not follow_up:
            self.note(message, _TOO_OLD_TO_FOLLOW_UP, logging.WARNING)
        lost = {"reason": reason}
        event = Event(EventType.WORKER_LOST, message.id, FINAL_SEQ, lost, run=message.run)
        self._report(message, envelope, event, delivery, follow_up=follow_up)

    def _live_process_may_run(
        self, delivery: Delivery, message: TaskMessage, reason: str, aside: str
    ) -> bool:
        """Whether a live process runs the task, or may: the delivery is then left alone.

        One that runs it holds its own delivery: this one is a copy (someone with broker
        access made it), neither a loss to report nor to rerun, and is dropped. When a live
        worker's registry entry cannot be read (nbtask did not write it), that worker may
        run it: the delivery is left for a later look.

        A loss seen just now (``aside``) is not judged by what live workers announced:
        that was written before it, and may name a run that ended since (a retry's first
        run, whose rerun was lost here). Its delivery is left, held by ``aside``: the
        sweep of lapsed leases gives it again past the visibility timeout (longer than
        three heartbeats), when every live worker has announced anew (RabbitMQ's parked
        lost deliveries are claimed anew at every sweep).
        """
        running = self.running()
        if running is None:
            if aside:
                self.transport.set_aside(delivery, aside)
            if message.id not in self._left_unknown:
                self._left_unknown.add(message.id)
                log.warning(
                    "left task %s's delivery unsettled: a live worker's registry entry cannot "
                    "be read (nbtask did not write it), so whether a live process runs it is "
                    "unknown; looked at again at later sweeps, said once",
                    message.id,
                )
            return True
        self._left_unknown.clear()  # the registry reads again: said anew if it stops
        if message.id not in running:
            return False
        if aside:
            why = "a live worker said it runs the task: looked at again past the visibility timeout"
            self.note(message, f"{reason}; {why}", logging.WARNING)
            self.transport.set_aside(delivery, aside)
            return True
        log.warning("dropped a copy of task %s's message: a live process runs it", message.id)
        self.transport.discard(delivery)
        return True

    def _report(
        self,
        message: TaskMessage,
        envelope: Envelope,
        event: Event,
        delivery: Delivery | None = None,
        *,
        follow_up: bool = True,
    ) -> None:
        """Store and send how the task ended (and ack ``delivery``), then follow it up."""
        report(
            self.transport,
            self.signer,
            message.id,
            message.client,
            event,
            delivery,
            owes_follow_ups=follow_up,
        )
        if follow_up:
            self._follow_up(message, envelope)

    def _past_time_limit(self, message: TaskMessage, event: Event, delivery: Delivery) -> None:
        """Store the end of a task killed past its hard time limit; its message goes back.

        Its handlers (``on_failure``, ``after_return``) did not run in its process, and
        this one runs no task code: the child that takes the message again finds the task
        ended, and runs them with its follow-ups, once (see ``FollowUps.run_owed``), as
        whoever RabbitMQ gives a killed child's message back to does.
        """
        report(self.transport, self.signer, message.id, message.client, event, owes_follow_ups=True)
        self.transport.move(delivery, delivery.queue, delivery.raw, message.id)

    def _refuse_too_old(self, delivery: Delivery, envelope: Envelope, message: TaskMessage) -> None:
        """Dead-letter a lost delivery of a message past ``max_age`` that never started."""
        why = (
            f"the message is older than max_age ({self.settings.replay_window:.0f} s) and "
            "may be a replay; it was not run"
        )
        self.note(message, f"rejected: {why}", logging.ERROR)
        self.transport.dead_letter(delivery)
        event = failure_event(message.id, FINAL_SEQ, NbtaskError(why), run=message.run)
        self._report(message, envelope, event, follow_up=False)

    def _follow_up(self, message: TaskMessage, envelope: Envelope) -> None:
        """Fail the chain's later steps and send the errbacks, if the stored outcome owes it."""
        self.follow_ups.run_owed(message, message.split(envelope)[1])

    def note(self, message: TaskMessage, text: str, level: int) -> None:
        """Log what happened to a task, and keep it in the task's journal."""
        log.log(level, "task %s [%s]: %s", message.name, message.id, text)
        with contextlib.suppress(BrokerUnavailable):
            self.store.append_journal(message.id, [f"{logging.getLevelName(level)} {text}"])

    def report_stopped(self, stopped: tuple[str, str, float], reason: str) -> None:
        """Store why a task this supervisor killed ended, unless it ended otherwise."""
        task_id = stopped[0]
        record = self.store.get_record(task_id)
        channel = record.client if record is not None else ""
        if (
            record is None
            or not self.store.is_channel(channel)
            or record.state is not State.STARTED
        ):
            return
        run = (self.settings.key_prefix, record.sent)
        event = stopped_event(stopped, reason, record.name or "task", run)
        # Its message comes back later (see _settle_verified, and Admission): whoever
        # holds it then runs the follow-ups.
        report(self.transport, self.signer, task_id, channel, event, owes_follow_ups=True)

    def rehome(self, queue: str, consumer: str, until: float = 0.0) -> tuple[int, bool]:
        """Move what waits on a gone process's own ``queue`` elsewhere; delete the queue.

        Each message goes to its signed ``fallback_queue`` (the queue it would have gone
        to without the holder), sealed again for that queue; one that does not verify is
        dead-lettered. One parked for ``queue`` until its due time is parked for that
        queue, due as it was (:data:`MOVED_PER_LOOK` of each at most per look). Until ``until``
        (``time.monotonic()``) this goes on while the queue cannot be deleted: RabbitMQ
        gives back what a gone process held (and ends its consumer) only once it sees
        that process's connection end. Returns how many were moved, and whether the
        queue is gone (not while messages on it or parked for it are left to move).
        """
        moved = 0
        while True:
            waiting, more_waiting = self._move_waiting(queue, consumer)
            reparked, more_parked = self._move_parked(queue)
            moved += waiting + reparked
            more = more_waiting or more_parked
            if not more and self.transport.drop_queue(queue):
                return moved, True
            if time.monotonic() >= until:
                if until:
                    why = "messages on it left to move" if more else "still consumed"
                    log.warning("left queue %r: %s, or a message came meanwhile", queue, why)
                return moved, False
            if not more:
                time.sleep(_REHOME_RETRY_SECONDS)

    def _move_waiting(self, queue: str, consumer: str) -> tuple[int, bool]:
        """Move what waits on a gone process's ``queue``, :data:`MOVED_PER_LOOK` at most.

        Returns how many were moved, and whether more may be left.
        """
        moved = 0
        batch = self.transport.take_waiting(queue, consumer, MOVED_PER_LOOK)
        for delivery in batch:
            opened = self._to_move(delivery.raw, queue, "on")
            if opened is None:
                self.transport.dead_letter(delivery)
                continue
            envelope, message = opened
            record = self.store.get_record(message.id)
            if record is not None and record.state not in WAITING_STATES:
                # Started by the gone process, and given back by the broker (AMQP).
                # A retry waiting here (its record RETRY) never started: it moves.
                why = "its worker process died (redelivered by the broker)"
                self._settle_verified(delivery, envelope, message, why)
                continue
            target, raw = self._sealed_for_fallback(message, envelope)
            if record is not None:
                # Named before any worker of the target can start it: its record
                # (what `nbtask inspect` shows, and a handle asking why the task waits
                # reads) says where it waits from now on.
                self.store.note_moved(message.id, target)
            self.transport.move(delivery, target, raw, message.id)
            why = f"the process whose queue it waited on is gone; moved to queue {target!r}"
            self.note(message, why, logging.WARNING)
            moved += 1
        return moved, len(batch) >= MOVED_PER_LOOK

    def _move_parked(self, queue: str) -> tuple[int, bool]:
        """Park what is parked for a gone process's ``queue`` elsewhere, due as it was.

        Each for the queue it falls back to, :data:`MOVED_PER_LOOK` at most. Returns how
        many were parked again, and whether more may be left.
        """
        moved = 0
        batch = self.transport.parked(queue, MOVED_PER_LOOK)
        for parked in batch:
            opened = self._to_move(parked.raw, queue, "parked for")
            if opened is None:
                self.transport.dead_letter_parked(parked)
                continue
            envelope, message = opened
            # Whatever its record says: the start check judges it where it runs, as it
            # would have on this queue (a task revoked meanwhile is refused there).
            target, raw = self._sealed_for_fallback(message, envelope)
            if not self.transport.repark(parked, target, raw, message.id):
                continue  # moved to its queue meanwhile, by its supervisor after all
            why = (
                f"the process whose queue it was parked for is gone; parked for queue "
                f"{target!r}, due as it was"
            )
            self.note(message, why, logging.WARNING)
            moved += 1
        return moved, len(batch) >= MOVED_PER_LOOK

    def _to_move(self, raw: bytes, queue: str, where: str) -> tuple[Envelope, TaskMessage] | None:
        """A message found ``where`` a gone process's ``queue``, opened to be moved.

        ``None`` (said why; the caller dead-letters it) if it does not verify, or was sent
        to another queue: it is sealed again for another, so only one sent to this one.
        """
        try:
            envelope = self.signer.open(raw)
            message = TaskMessage.from_header(envelope.header)
        except NbtaskError as exc:
            log.error("dead-lettered an unverifiable message %s %s: %s", where, queue, exc)
            return None
        elsewhere = message.sent_elsewhere(self.settings.key_prefix, queue)
        if elsewhere is not None:
            log.error("dead-lettered a message %s %s: %s", where, queue, elsewhere)
            return None
        return envelope, message

    def _sealed_for_fallback(self, message: TaskMessage, envelope: Envelope) -> tuple[str, bytes]:
        """The queue a message on a gone process's queue falls back to, and it sealed for it."""
        target = message.fallback_queue or self.settings.default_queue
        # Its signed due time stays the sender's: it ages (max_age) as it would have.
        header = {**message.to_header(), "queue": target}
        return target, self.signer.seal(header, envelope.body)
