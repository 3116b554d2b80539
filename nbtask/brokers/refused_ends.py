"""A task's end the store did not keep, or kept over a record it did not write.

A task ends once (see ``WRITE_FINAL`` in :mod:`nbtask.brokers.scripts`): the script
storing a task's end answers ``''`` once it wrote it, ``'!'`` and a plain final state it
wrote over, else what refused it. Two answers are worth a line in the worker's log:

* a task that ran to its end after another worker had reported it lost (its record holds
  the signed ``WORKER_LOST``), because this worker stopped answering for a while (paused,
  or cut off from the broker) and its heartbeats lapsed. Its outcome is dropped, and the
  user would not know why without that line;
* a record whose plain state said the task had ended while nothing signed did (no stored
  outcome, no ended-task entry): nbtask did not write it, and the outcome was stored over
  it (else the task's result would be lost, and a replay of its message could run again).
"""

from __future__ import annotations

import logging

from nbtask.brokers.handoffs import Settlement

__all__ = ["refused_by"]

log = logging.getLogger(__name__)

_LOST = "WORKER_LOST"
_WROTE_OVER = "!"


def refused_by(end: Settlement, reply: object) -> str:
    """What kept ``end`` from being stored (``''``: it was stored).

    ``reply`` is the storing script's: a record's final state, ``'ENDED'`` (the
    ended-task set alone), or ``''``. A task that ended after it had been reported lost,
    and an end stored over a plain final state nbtask did not write, are said in the log.
    """
    if not reply:  # stored: the usual answer, nothing to weigh
        return ""
    refused = _text(reply)
    state = _text(end.fields.get("state", b""))
    if refused.startswith(_WROTE_OVER):
        log.warning(
            "task %s ended (%s) over a record whose plain state said %s with no signed "
            "outcome: nbtask did not write that state (someone with write access to the "
            "store did); its outcome was stored",
            end.task_id,
            state,
            refused[len(_WROTE_OVER) :],
        )
        return ""
    if refused == _LOST and state and state != _LOST:
        log.warning(
            "task %s ended (%s) after it had been reported lost: its outcome was not kept "
            "(the record stays WORKER_LOST). This worker stopped answering for a while "
            "(paused, or cut off from the broker) past its heartbeats and the visibility "
            "timeout, so another worker settled the task as lost",
            end.task_id,
            state,
        )
    return refused


def _text(value: object) -> str:
    """A script's reply or a record field as text (``''`` for anything else)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""
