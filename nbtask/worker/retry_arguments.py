"""A retry with other arguments (Celery's ``self.retry(args=..., kwargs=...)``).

A retry is the task's own message sent again, ``retries`` one more; with other arguments,
its arguments part is made anew (large parts stored as blobs, kept as the first ones are
until the task ends), its code and callbacks kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from nbtask.errors import NbtaskError
from nbtask.wire.blobs import argument_keeper
from nbtask.wire.envelope import Buffer
from nbtask.wire.message import TaskMessage, split
from nbtask.worker.admit import Admitted
from nbtask.worker.settle import Outcome

__all__ = ["PutBlobs", "retry_message", "with_retry_arguments"]

#: Stores blobs under a keeper: ``put_blobs(blobs, keeper)``.
PutBlobs = Callable[[Mapping[str, Buffer], str], object]
#: The failure outcome of a message: ``failed(message, exc, seq)``.
Failed = Callable[[TaskMessage, BaseException, int], Outcome]


def with_retry_arguments(
    admitted: Admitted, outcome: Outcome, threshold: int, put_blobs: PutBlobs, failed: Failed
) -> Outcome:
    """The retry ``outcome`` ready to send with the arguments it gave; a failure if it cannot be.

    ``outcome`` has the run's arguments and request; a failure keeps them (its handlers'),
    and says why: the arguments cannot be serialised, or their blobs stored.
    """
    assert outcome.retry_arguments is not None
    new_args, new_kwargs = outcome.retry_arguments
    try:
        outcome.retry_send = retry_message(
            admitted.message,
            (admitted.code, admitted.callbacks),
            outcome.args if new_args is None else new_args,
            outcome.kwargs if new_kwargs is None else new_kwargs,
            threshold,
            put_blobs,
        )
    except NbtaskError as exc:
        failure = failed(admitted.message, exc, outcome.event.seq)
        failure.args, failure.kwargs, failure.request = (
            outcome.args,
            outcome.kwargs,
            outcome.request,
        )
        return failure
    return outcome


def retry_message(
    message: TaskMessage,
    parts: tuple[Buffer, Buffer],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    threshold: int,
    put_blobs: PutBlobs,
) -> tuple[TaskMessage, tuple[Buffer, ...]]:
    """The message of a retry that runs with ``args`` and ``kwargs``, and its body's parts.

    ``parts`` are the message's code and callbacks, kept. The datasets the task requires
    are left out of ``kwargs``: its worker passes them.

    Raises
    ------
    SerializationError
        The arguments cannot be serialised with the task's serializer.
    """
    requires = set(message.requires or ())
    kept = {name: value for name, value in kwargs.items() if name not in requires}
    what = f"the arguments of the retry of task {message.name!r}"
    payload = split((list(args), kept), message.serializer, what, threshold)
    if payload.blobs:
        put_blobs(payload.blobs, argument_keeper(message.id))
    retried = dataclasses.replace(message, args_layout=payload.layout_json)
    return retried, (*parts, *payload.inline)
