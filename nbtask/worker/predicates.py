"""Celery's ``Reject`` and ``Ignore``, raised by task code: how a worker settles them.

Neither calls the task's handlers nor retries it by itself (Celery's trace does not).
``Ignore``: the message is acknowledged and nothing is stored. ``Reject(requeue=True)``:
the message is put back after a delay that doubles each time (1 s, 2 s, 4 s...), at most
``max_redeliveries`` times: the times already put back travel in the message itself
(``rejects``, signed by the worker that put it back), so the count holds whichever worker
takes it next, and nothing an outsider can write in the store changes it. Then, or with
``requeue=False``, the task fails with the ``Reject`` as its error, as Celery 5 records it
(its errbacks are sent).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from nbtask.brokers import Transport
from nbtask.core.handlers import exception_info
from nbtask.errors import Ignore, Reject, TaskPredicate
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer
from nbtask.wire.events import State
from nbtask.wire.message import TaskMessage
from nbtask.wire.records import REQUEUED_COPY
from nbtask.worker.admit import Admitted
from nbtask.worker.settle import Outcome, failure_body, failure_event, reject_requeue

__all__ = ["REQUEUED", "Predicates", "predicate_outcome"]

log = logging.getLogger("nbtask.worker")

#: Said in the worker's log each time a reject puts a task back on its queue.
REQUEUED = "rejected and put back on its queue"
_FIRST_DELAY_SECONDS = 1.0


def predicate_outcome(
    message: TaskMessage, exc: TaskPredicate, seq: int, whoami: Mapping[str, Any]
) -> Outcome:
    """The outcome of a run that raised ``Reject`` or ``Ignore``: a FAILURE, if stored."""
    event = failure_event(message.id, seq, exc, whoami, run=message.run)
    return Outcome(event, failure_body(exc), exc=exc, einfo=exception_info(exc))


class Predicates:
    """Settles what :func:`predicate_outcome` made, where it is not a plain failure.

    Parameters
    ----------
    transport
        Where the message is acknowledged or put back.
    settings
        ``max_redeliveries``: how many times a reject may put a message back.
    signer
        Seals a message put back, with the times it was put back.
    """

    def __init__(self, transport: Transport, settings: Settings, signer: Signer) -> None:
        self.transport = transport
        self.settings = settings
        self.signer = signer

    def set_aside(self, admitted: Admitted, outcome: Outcome) -> bool:
        """Acknowledge an ignored task, or put a rejected one back; True if so.

        False: the task fails with the ``Reject`` (the caller settles it so).
        """
        message, delivery = admitted.message, admitted.delivery
        said = f"task {message.name}[{message.id}]"
        exc = outcome.exc
        if isinstance(exc, Ignore):
            log.info("%s ignored", said)
            self.transport.discard(delivery)
            return True
        assert isinstance(exc, Reject)
        if exc.requeue:
            times = message.rejects
            if times < self.settings.max_redeliveries:
                delay = _FIRST_DELAY_SECONDS * 2**times
                log.warning("%s %s (%s); runs again in %.0f s", said, REQUEUED, exc, delay)
                back = reject_requeue(self.signer, message, admitted.envelope.body, delay)
                # The copy put back is named in the record: an earlier one (this one,
                # replayed) is refused at its start check.
                state = {
                    "state": State.PENDING.value,
                    REQUEUED_COPY: f"{message.retries}:{message.rejects + 1}",
                }
                self.transport.finish(
                    delivery, message.id, message.client, b"", state, requeue=back
                )
                return True
            log.warning("%s rejected (%s), put back %d time(s) already: failed", said, exc, times)
            return False
        log.warning("%s rejected: %s", said, exc)
        return False
