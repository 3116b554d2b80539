"""Celery's ``celery.states``: the state names a task's handle reports, and their sets.

``from nbtask import states`` then ``h.state == states.SUCCESS``: each name is the
:class:`~nbtask.State` member, which equals its plain string (``"SUCCESS"``), so code
comparing with Celery's strings works either way. ``WORKER_LOST`` is nbtask's own: the
worker process running the task died. ``RECEIVED``, ``REJECTED`` and ``IGNORED`` are
Celery's names that nbtask never reports; they are here so that code naming them imports.
"""

from __future__ import annotations

from nbtask.wire.events import State

__all__ = [
    "ALL_STATES",
    "EXCEPTION_STATES",
    "FAILURE",
    "IGNORED",
    "PENDING",
    "PROPAGATE_STATES",
    "READY_STATES",
    "RECEIVED",
    "REJECTED",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "UNREADY_STATES",
    "WORKER_LOST",
]

#: Not known to have started: queued, waiting for its countdown, or unknown.
PENDING = State.PENDING
#: A worker runs it.
STARTED = State.STARTED
#: It failed and waits to run again.
RETRY = State.RETRY
#: It returned a result.
SUCCESS = State.SUCCESS
#: It raised.
FAILURE = State.FAILURE
#: It was revoked (cancelled, or expired before it started).
REVOKED = State.REVOKED
#: nbtask's own: the worker process running it died.
WORKER_LOST = State.WORKER_LOST
#: Celery's; never reported by nbtask (a received task is ``PENDING`` until it starts).
RECEIVED = "RECEIVED"
#: Celery's; never reported by nbtask.
REJECTED = "REJECTED"
#: Celery's; never reported by nbtask.
IGNORED = "IGNORED"

#: The states of a task that ended.
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED, WORKER_LOST})
#: The states of a task that has not ended.
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, RETRY})
#: The states whose outcome is an exception.
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED, WORKER_LOST})
#: The states in which ``get()`` raises the task's exception.
PROPAGATE_STATES = frozenset({FAILURE, REVOKED, WORKER_LOST})
#: Every state name.
ALL_STATES = frozenset(
    {PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, WORKER_LOST, REJECTED, IGNORED}
)
