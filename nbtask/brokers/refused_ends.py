"""A task's end the store did not keep: its record was final already.

A final state stays final (see ``WRITE_FINAL`` in :mod:`nbtask.brokers.scripts`): the
script storing a task's end answers ``''`` once it wrote it, else the final state that
refused it. One refusal is worth a line in the worker's log: a task that ran to its end
after another worker had reported it lost (``WORKER_LOST``), because this worker stopped
answering for a while (paused, or cut off from the broker) and its heartbeats lapsed.
Its outcome is dropped, and the user would not know why without that line.
"""

from __future__ import annotations

import logging

from nbtask.brokers.base import Settlement

__all__ = ["refused_by"]

log = logging.getLogger(__name__)

_LOST = "WORKER_LOST"


def refused_by(end: Settlement, reply: object) -> str:
    """The final state that kept ``end`` from being stored (``''``: it was stored).

    ``reply`` is the storing script's. A task that ended after it had been reported lost
    is said in the log (its record stays ``WORKER_LOST``).
    """
    refused = _text(reply)
    state = _text(end.fields.get("state", b""))
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
