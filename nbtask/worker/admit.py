"""Admitting a delivery: verify it, and decide whether its task may start now.

A message that does not verify is dead-lettered; one whose task may not start (already
finished, revoked, or its record overwritten) is dropped; one too old, expired or from
the worker's future is settled here without running. What follows a task (its errbacks,
its chain's later steps) is sent only where no replay of a captured message can have it
sent again: once, as its signed stored outcome owes (``FollowUps.run_owed``), and never
for a message older than ``max_age``, which may be a replay. A task taken before its eta,
or over its rate limit, is parked until it may start, so it does not hold the child's slot
while it waits.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from nbtask._process import current_pid
from nbtask.brokers import Delivery, StartBy, Transport, Verdict
from nbtask.core.task import Task
from nbtask.errors import NbtaskError
from nbtask.settings import Settings
from nbtask.wire.envelope import Buffer, Envelope, Signer
from nbtask.wire.events import FINAL_SEQ, FINAL_STATES, Event, EventType, State
from nbtask.wire.message import TaskMessage
from nbtask.wire.records import MAX_REVOKE_BYTES
from nbtask.worker.follow_ups import FollowUps
from nbtask.worker.settle import (
    Outcome,
    failure_event,
    report,
    send_stored_outcome,
)

__all__ = ["Admission", "Admitted", "Settle", "message_age"]

log = logging.getLogger("nbtask.worker")

#: Start verdicts of a task that ended: its record holds a final state or a signed outcome.
_ENDED = frozenset({Verdict.FINISHED, Verdict.REVOKED, *(state.value for state in FINAL_STATES)})
#: How many times a start check is asked again with a revoke kept in the task's record,
#: checked, or after it deleted one too large to check (a revoke is changed or put back in
#: between only by someone writing there behind nbtask's back).
_VET_ROUNDS = 3
#: Why a task whose start check could not be settled (its record kept being rewritten
#: behind nbtask's back) was not run.
_UNCHECKABLE = {
    Verdict.BAD_RECORD: (
        "the record of task {task} in the store is not one nbtask wrote (it was overwritten "
        "with another type); the task was not run"
    ),
    Verdict.KEPT_REVOKE: (
        "the revoke kept in the record of task {task} kept changing while it was checked "
        "(not written by nbtask); the task was not run"
    ),
    Verdict.BIG_REVOKE: (
        "a revoke larger than nbtask writes was put in the record of task {task} again each "
        "time it was deleted (not written by nbtask); the task was not run"
    ),
}
# A message taken this long before its signed eta was moved early in the store (clocks of
# the sender and the worker may differ by less): it is parked again until its eta.
_EARLY_SECONDS = 1.0
#: A rate-limited task whose start is at most this far off waits for it in its process.
_RATE_HOLD_SECONDS = 0.1
#: How far in this worker's future a message's signed ``created`` may be (its sender's
#: clock ahead). A message is valid until ``created + max_age``: one from further ahead
#: would outlive the memory of its ended task (kept 60 s past max_age from its end), and
#: a replay of it would run again.
AHEAD_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Admitted:
    """A delivery that verified and may start: its message and the body's parts."""

    delivery: Delivery
    envelope: Envelope
    message: TaskMessage
    code: Buffer
    callbacks: Buffer
    arguments: Buffer


class Settle(Protocol):
    """How the child settles a task that will not run: store, tell the client, maybe ack."""

    def __call__(
        self, admitted: Admitted, outcome: Outcome, *, ack: bool = ..., owes: bool = ...
    ) -> object:
        """Settle ``admitted`` with ``outcome``; acknowledge its delivery if ``ack``.

        With ``owes`` the stored outcome says its follow-ups are owed
        (``FollowUps.run_owed``).
        """


class Admission:
    """The admit step of a child: which deliveries may start, and when.

    Parameters
    ----------
    settings, transport, signer
        The child's settings, broker and signer.
    follow_ups
        What follows a task settled here (a revoked or expired task's links).
    settle
        How the child settles a task it will not run.
    hostname, consumer, worker_id
        Who takes the task (for its start check) and whose rate-limit buckets count it.
    handled
        The task whose handlers run for an outcome its own process did not live to
        handle, ready to (see ``FollowUps.run_owed``); ``None`` if it has none.
    """

    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        signer: Signer,
        follow_ups: FollowUps,
        settle: Settle,
        *,
        hostname: str,
        consumer: str,
        worker_id: str,
        handled: Callable[[Admitted, Outcome], Task | None] | None = None,
    ) -> None:
        self.settings = settings
        self.handled = handled
        self.transport = transport
        self.signer = signer
        self.follow_ups = follow_ups
        self.settle = settle
        self.hostname = hostname
        self.consumer = consumer
        self.worker_id = worker_id

    def admit(self, delivery: Delivery) -> Admitted | None:
        """Verify a delivery and decide whether it may start; settle it here if not."""
        try:
            envelope = self.signer.open(delivery.raw)
            message = TaskMessage.from_header(envelope.header)
            if delivery.task_id is not None and delivery.task_id != message.id:
                raise NbtaskError("the queue entry names another task than the message")
        except NbtaskError as exc:
            self._reject(delivery, exc)
            return None
        elsewhere = message.sent_elsewhere(self.settings.key_prefix, delivery.queue)
        if elsewhere is not None:
            self._reject(delivery, NbtaskError(elsewhere))
            return None
        code, callbacks, arguments = message.split(envelope)
        admitted = Admitted(delivery, envelope, message, code, callbacks, arguments)
        refused = self._start_verdict(admitted)
        if refused is not None:
            self._drop(admitted, refused)
            return None
        return None if self._not_now(admitted) else admitted

    def rate_limited(self, admitted: Admitted, task: Task) -> bool:
        """Put a task over its rate limit back for later, without holding this slot."""
        if task.rate_limit is None or self.settings.worker_disable_rate_limits:
            return False
        message = admitted.message
        bucket = f"{self.worker_id}:{message.name}"
        horizon = self.settings.replay_window
        # The start given is the time of asking plus the wait, not the wait counted from
        # a later look at the clock: a child paused after the answer (a loaded machine)
        # parked the task past its start, and the task given the start after it came
        # back first and took its turn.
        asked = time.time()
        wait = self.transport.store.rate_wait(bucket, task.rate_limit, message.id, horizon)
        if 0 < wait <= _RATE_HOLD_SECONDS:
            # Its start is this close: waited for here, not behind the tasks after it
            # (a task put back comes back a little late; the next may be on time).
            time.sleep(max(0.0, asked + wait - time.time()))
            asked = time.time()
            wait = self.transport.store.rate_wait(bucket, task.rate_limit, message.id, horizon)
        if wait <= 0:
            return False
        self._park(admitted, asked + wait)
        return True

    def _not_now(self, admitted: Admitted) -> bool:
        """Park a task taken before its eta; settle one too old or expired. True if so."""
        message, now = admitted.message, time.time()
        if message.created > now + AHEAD_SECONDS:
            ahead = message.created - now
            # Followed up only if the record of this refusal outlives the time a copy of
            # the message would be refused so again: a replay then finds it, and is
            # dropped. From further ahead, a replay once the record is gone would be.
            remembered = ahead - AHEAD_SECONDS < int(self.settings.result_ttl)
            self._refuse(admitted, _from_the_future(ahead), follow_up=remembered)
            return True
        if message.eta is not None and message.eta > now + _EARLY_SECONDS:
            self._park(admitted, message.eta)
            return True
        age = message_age(message, now)
        if age > self.settings.replay_window:
            self._too_old(admitted, age)
            return True
        if message.expires is not None and now > message.expires:
            # Celery's way: revoked with reason "expired", its errbacks called. Within
            # max_age, so its record (kept result_ttl >= max_age) refuses any replay.
            reason = {"reason": "expired"}
            expired = Event(EventType.REVOKED, message.id, FINAL_SEQ, reason, run=message.run)
            self._end_unrun(admitted, Outcome(expired))
            return True
        return False

    def _end_unrun(
        self, admitted: Admitted, outcome: Outcome, *, dead_letter: bool = False
    ) -> None:
        """Settle a task that will not run with ``outcome``, then follow it up, once.

        As for a task its worker lost: its errbacks are sent and its chain's later steps end
        with its outcome. The outcome is stored owing them before its message is let go
        (dead-lettered, or acknowledged): a process that dies in between leaves both to
        whoever settles the message then (its supervisor; on RabbitMQ, whoever it comes
        back to), which runs them if still owed (``FollowUps.run_owed``).
        """
        self.settle(admitted, outcome, ack=False, owes=True)
        try:
            self.follow_ups.run_owed(admitted.message, admitted.callbacks)
        finally:
            if dead_letter:
                self.transport.dead_letter(admitted.delivery)
            else:
                self.transport.discard(admitted.delivery)

    def _park(self, admitted: Admitted, due: float) -> None:
        """Put a task back to PENDING (the start check marked it STARTED) until ``due``."""
        message, delivery = admitted.message, admitted.delivery
        state = {"state": State.PENDING.value}
        self.transport.finish(
            delivery, message.id, message.client, b"", state, requeue=(delivery.raw, due)
        )

    def _reject(self, delivery: Delivery, exc: BaseException) -> None:
        """Dead-letter a message that does not verify (and settle its task, if one began)."""
        log.error(
            "rejected message %s on queue %s: %s; moved to the dead-letter stream",
            delivery.delivery_id,
            delivery.queue,
            exc,
        )
        self.transport.dead_letter(delivery)
        if delivery.verdict == Verdict.OK and delivery.task_id:
            self._report_unverifiable(delivery.task_id, exc)

    def _report_unverifiable(self, task_id: str, exc: BaseException) -> None:
        """Settle a task whose message failed verification (it was marked STARTED)."""
        record = self.transport.store.get_record(task_id)
        if record is None or not self.transport.store.is_channel(record.client):
            # No client sent this task: the id beside the message was forged, and the
            # record is the start check's alone.
            self.transport.store.forget_unsent(task_id)
            return
        why = NbtaskError(f"the message for this task failed verification and was not run: {exc}")
        report(
            self.transport,
            self.signer,
            task_id,
            record.client,
            failure_event(task_id, FINAL_SEQ, why, run=(self.settings.key_prefix, record.sent)),
        )

    def _start_verdict(self, admitted: Admitted) -> str | None:
        """``None`` if the task may start (it is now STARTED), else the state forbidding it.

        A duplicate or a replay of a finished task leaves that task's record as it is.
        """
        verdict, message = admitted.delivery.verdict, admitted.message
        if verdict == Verdict.OK:  # decided with the delivery: the usual case
            return None
        # The pid the transport's own start check names (current_pid: no system call).
        by = StartBy(self.hostname, str(current_pid()), self.consumer)
        copy = (message.retries, message.rejects)
        # A revoke kept in its record is checked here (the start check cannot), then the
        # check asked again with it; one that changed in between is handed back again. One
        # too large to be nbtask's was deleted unread by the check, which is asked again.
        for _ in range(_VET_ROUNDS):
            if verdict == Verdict.BIG_REVOKE:
                _deleted_big_revoke(message.id)
            elif verdict is not None and verdict != Verdict.KEPT_REVOKE:
                break
            revoke = self._vet_revoke(message) if verdict == Verdict.KEPT_REVOKE else None
            verdict = self.transport.store.start(message.id, by, copy=copy, revoke=revoke)
        if verdict == Verdict.BIG_REVOKE:
            _deleted_big_revoke(message.id)
        return None if verdict == Verdict.OK else verdict

    def _vet_revoke(self, message: TaskMessage) -> tuple[bytes, bool]:
        """The revoke kept in the task's record, and whether it is a genuine one of it.

        Anyone with write access to the store can put one there: one whose signature does
        not verify, or that is not a revoke of this task, is deleted by the start check
        (logged here), and the task starts as if it were not there.
        """
        raw = self.transport.store.kept_revoke(message.id) or b""
        try:
            event = Event.from_header(self.signer.open(raw).header)
            if event.type is not EventType.REVOKED or event.task_id != message.id:
                raise NbtaskError("it is not a revoke of this task")
        except NbtaskError as exc:
            if raw:
                log.warning(
                    "deleted a revoke kept in task %s's record that was not its client's "
                    "(%s); the task was not revoked",
                    message.id,
                    exc,
                )
            return raw, False
        return raw, True

    def _drop(self, admitted: Admitted, refused: str) -> None:
        """Let go of a message whose task may not start; follow it up if its outcome owes it.

        Only through a signed stored outcome owing follow-ups, taken once: a task whose
        record merely says ``REVOKED`` (a plain field anyone with write access can set)
        has nothing sent for it, and neither has a message older than ``max_age``.
        """
        message = admitted.message
        if refused in _UNCHECKABLE:
            why = NbtaskError(_UNCHECKABLE[refused].format(task=message.id))
            self._reject(admitted.delivery, why)
            # The message verified, so its client is known: tell it (the record is replaced).
            failed = failure_event(message.id, FINAL_SEQ, why, run=message.run)
            self.settle(admitted, Outcome(failed), ack=False)
            return
        if refused == Verdict.SUPERSEDED:
            log.warning(
                "dropped a message for task %s: a copy of it (retries %d, put back %d "
                "time(s)) that ran before a later one was put back (a duplicate)",
                message.id,
                message.retries,
                message.rejects,
            )
            self.transport.discard(admitted.delivery)
            return
        said = State.REVOKED.value if refused == Verdict.REVOKED else refused
        log.warning("dropped a message for task %s: it is already %s", message.id, said)
        self.transport.discard(admitted.delivery)
        if refused not in _ENDED:
            return
        # Revoked only now (its client's revoke was held in the record): not told yet.
        self._tell_outcome_again(message, first=refused == Verdict.REVOKED)
        if message_age(message) > self.settings.replay_window:
            return  # it may be a replay: nothing it carries is acted on
        # Revoked before it started (the revoke stored its signed outcome owing them), or
        # its supervisor stated how it ended (a killed child whose message RabbitMQ gave
        # back): its follow-ups are run here, if no one ran them yet.
        handled = self.handled
        owed = self.follow_ups.run_owed(
            message,
            admitted.callbacks,
            None if handled is None else lambda outcome: handled(admitted, outcome),
        )
        if owed is None and refused == State.REVOKED.value and admitted.callbacks:
            log.warning(
                "task %s's record says REVOKED without a signed outcome owing its follow-ups: "
                "its errbacks are not sent and its chain's later steps not ended",
                message.id,
            )

    def _tell_outcome_again(self, message: TaskMessage, *, first: bool = False) -> None:
        """Send a finished task's stored outcome to its client (see send_stored_outcome).

        ``first``: its client's channel has not had it yet, and keeps it now.
        """
        try:
            record = self.transport.store.get_record(message.id)
        except NbtaskError as exc:
            log.warning("could not read task %s's stored outcome to send: %s", message.id, exc)
            return
        if first and record is not None and record.result:
            self.transport.emit(message.client, [record.result])
            return
        send_stored_outcome(self.transport, message.client, record)

    def _too_old(self, admitted: Admitted, age: float) -> None:
        """Refuse a message past ``max_age``, and act on nothing it carries.

        It may be a replay (its task ran, and its record and ended-task entry are gone):
        its errbacks are not sent, nor its chain's later steps failed.
        """
        why = (
            f"the message was {age:.0f} s old, older than max_age "
            f"({self.settings.replay_window:.0f} s); it was not run"
        )
        self._refuse(admitted, why)

    def _refuse(self, admitted: Admitted, why: str, *, follow_up: bool = False) -> None:
        """Dead-letter a genuine message that may not run now or ever, and fail its task.

        With ``follow_up`` its errbacks are sent and its chain's later steps fail, once:
        only where no replay of the message can be refused so again.
        """
        message = admitted.message
        log.error("rejected task %s: %s", message.id, why)
        failed = Outcome(failure_event(message.id, FINAL_SEQ, NbtaskError(why), run=message.run))
        if follow_up:
            self._end_unrun(admitted, failed, dead_letter=True)
            return
        self.settle(admitted, failed, ack=False)
        self.transport.dead_letter(admitted.delivery)


def _deleted_big_revoke(task_id: str) -> None:
    log.warning(
        "deleted a revoke kept in task %s's record that was not its client's (it was larger "
        "than any nbtask writes, %s bytes, and was not read); the task was not revoked",
        task_id,
        f"{MAX_REVOKE_BYTES:,}",
    )


def message_age(message: TaskMessage, now: float | None = None) -> float:
    """How old a message is, from its signed due time: past ``max_age`` it may be a replay.

    A countdown or a retry does not age while it waits.
    """
    return (time.time() if now is None else now) - max(message.created, message.eta or 0.0)


def _from_the_future(ahead: float) -> str:
    return (
        f"the message was created {ahead:.0f} s in this worker's future (more than "
        f"{AHEAD_SECONDS:.0f} s): its sender's clock is ahead, and a copy of it replayed "
        "later would outlive the memory that it ran; it was not run. Set the sender's "
        "clock right (NTP) and send it again"
    )
