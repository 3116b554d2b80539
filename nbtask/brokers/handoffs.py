"""What passes between the layers above and a broker, besides raw bytes.

A message to publish (:class:`Publish`), a delivery a worker holds (:class:`Delivery`), a
message parked until its due time (:class:`Parked`), a task's end as the store keeps it
(:class:`Settlement`), who asks the start check (:class:`StartBy`) and what it answers
(:class:`Verdict`). The broker's protocols,
:class:`~nbtask.brokers.base.Transport` and :class:`~nbtask.brokers.base.Store`, take
and return these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from nbtask.wire.records import RecordFields

__all__ = ["Delivery", "Parked", "Publish", "Settlement", "StartBy", "Verdict"]


class Verdict:
    """What the start check says of a delivered task (besides a state that forbids it)."""

    #: It may run: it is now STARTED by the asking consumer.
    OK = "OK"
    #: The delivery carries no task id beside it, or its task's message was put back
    #: (only its signed header tells which copy it is): ask
    #: :meth:`~nbtask.brokers.base.Store.start` once the signed header is read.
    ASK = "NOID"
    #: A redelivered message whose task another holder STARTED and then lost (it died).
    LOST = "LOST"
    #: The task already ended: its record holds a signed final outcome (whatever the
    #: plain state field says).
    FINISHED = "FINISHED"
    #: The task's record is not one nbtask wrote (another Redis type): nothing may start.
    BAD_RECORD = "BADRECORD"
    #: Its client revoked it while its record said it had started: that signed revoke is
    #: now its stored outcome (owing its follow-ups), for the worker to send its client.
    REVOKED = "REVOKEDNOW"
    #: Its record keeps a revoke naming it, whose signature the start check cannot check:
    #: nothing is marked; ask :meth:`~nbtask.brokers.base.Store.start` again with that
    #: revoke (``revoke=``) once its signature is checked.
    KEPT_REVOKE = "KEPTREVOKE"
    #: Its record kept a revoke larger than any nbtask writes
    #: (:data:`~nbtask.wire.records.MAX_REVOKE_BYTES`): a forged one, deleted unread.
    #: Nothing is marked: ask :meth:`~nbtask.brokers.base.Store.start` again.
    BIG_REVOKE = "BIGREVOKE"
    #: An earlier copy of a message that was put back since (a retry, a
    #: ``Reject(requeue=True)``): that copy ran already, and the one put back is due.
    SUPERSEDED = "SUPERSEDED"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A message handed to a worker and not yet acknowledged.

    ``deliveries`` counts earlier deliveries that ended with the worker dead. ``verdict``
    is set when the transport already ran the start check: ``"OK"`` (the task is now
    STARTED) or the state that forbids it; ``None`` means "ask
    :meth:`~nbtask.brokers.base.Store.start`".
    """

    queue: str
    delivery_id: str
    raw: bytes
    deliveries: int = 0
    verdict: str | None = None
    #: The task id as the transport saw it (unverified; checked against the signed header).
    task_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Parked:
    """A message parked for ``queue`` until ``due`` (epoch seconds): a countdown, an ETA.

    As the broker keeps it: ``member`` is ``"<task id>:<message>"`` (the task id unverified,
    checked against the signed header) and ``where`` names where it waits, for the
    broker alone.
    """

    queue: str
    where: str
    member: bytes
    due: float

    @property
    def raw(self) -> bytes:
        """The message (the whole member when no task id is kept beside it)."""
        cut = self.member.find(b":")
        return self.member[cut + 1 :] if cut > 0 else self.member


@dataclasses.dataclass(frozen=True)
class Publish:
    """One message to enqueue: ``raw`` for ``queue``, due at ``eta`` (epoch seconds) if set."""

    queue: str
    task_id: str
    raw: bytes
    record: RecordFields
    eta: float | None = None


@dataclasses.dataclass(frozen=True)
class Settlement:
    """A task's end as the store keeps it: its record, its client's event, a retry to park.

    An empty ``fields`` deletes the task's record and an empty ``raw_event`` tells the
    client nothing; ``later`` (a message and its due time, epoch seconds) is parked on
    the ETA set of ``later_queue``, else of ``queue``, until then: a retry.
    """

    task_id: str
    channel: str
    raw_event: bytes
    fields: Mapping[str, str | bytes]
    queue: str = ""
    later: tuple[bytes, float] | None = None
    #: The queue a retry goes to when not its own (``self.retry(queue=...)``).
    later_queue: str = ""


@dataclasses.dataclass(frozen=True)
class StartBy:
    """Who asks the start check: a worker host, a process and its consumer name."""

    worker: str
    pid: str
    consumer: str
