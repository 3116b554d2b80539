"""Tasks whose messages never reached the broker, though their send had returned.

A single ``delay()`` returns once its message is written, before RabbitMQ confirms it
(see :mod:`nbtask.brokers.amqp_confirms`) or Redis replies (see
:meth:`~nbtask.brokers.redis_link.RedisLink.send_unanswered`). If the answer never comes
(the connection dropped and the broker cannot be reached to send the message again, or
the broker refused it), the task is revoked here: it never runs, even if its message did get
through, and its handle fails saying why. A task already started did get through, and is
left alone. A message Redis took but never answered for (it stalled) is not revoked: it
may run when Redis wakes, and the send raises
:class:`~nbtask.errors.SendUnconfirmed` instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from nbtask.brokers import Transport
from nbtask.client.listener import Listener
from nbtask.core.handle import TaskHandle
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import FINAL_SEQ, FINAL_STATES, Event, EventType

__all__ = [
    "CLOSED_REASON",
    "UNSENT_REASON",
    "expected_handle",
    "give_back",
    "restore_refused",
    "reused_ids",
    "revoke_unsent",
]

log = logging.getLogger(__name__)

UNSENT_REASON = (
    "its message was not confirmed by the broker (the connection dropped and the broker "
    "could not be reached to send it again, the broker did not answer in time, or it "
    "refused it); it will not run: send it again"
)
#: Why a task is revoked when the app closes: sent without waiting by a thread that did
#: not flush, it was still unconfirmed after the few seconds closing waits for it.
CLOSED_REASON = (
    "its message was not confirmed by the broker before the app closed (still unanswered "
    "after the few seconds closing waits, or the broker could not be reached to send it "
    "again, or refused it); it will not run: send it again"
)


def revoke_unsent(
    transport: Transport,
    signer: Signer,
    channel: str,
    prefix: str,
    listener: Listener | None,
    why: str = UNSENT_REASON,
    also: Sequence[str] = (),
) -> list[str]:
    """Revoke the tasks the transport could not deliver; fail their handles. Their ids.

    ``prefix`` is the app's key prefix (the events name it, and each handle's send);
    ``why`` the reason the events and the log give; ``also``, more tasks to revoke (ones
    the broker took and never answered for, at close).
    """
    unsent = transport.take_unsent()
    if not unsent and not also:  # (after every send and flush: nearly always)
        return []
    revoked: list[tuple[str, Event, bytes]] = []
    kept: list[str] = []  # where each revoked one was kept on the channel ('' unknown)
    for task_id in dict.fromkeys([*also, *unsent]):
        handle = listener.get(task_id) if listener is not None else None
        run = (prefix, handle.sent if handle is not None else None)
        reason = {"reason": why}
        event = Event(EventType.REVOKED, task_id, FINAL_SEQ, reason, run=run)
        raw = signer.seal(event.to_header())
        entry = ""
        try:
            entry = transport.store.revoke_pending(task_id, raw, channel)
            if not entry:
                continue  # it started: its message did get through
        except BrokerUnavailable as exc:
            log.error(
                "task %s: %s; the store is unreachable too (%s), so if its message did reach "
                "the broker it may still run",
                task_id,
                why,
                exc,
            )
        else:
            log.error("task %s: %s", task_id, why)
        revoked.append((task_id, event, raw))
        kept.append(entry)
    if revoked:
        with contextlib.suppress(BrokerUnavailable):
            # The store keeps them; this reaches a client re-attached elsewhere at once.
            transport.notify(channel, [raw for _, _, raw in revoked], entries=kept)
    for task_id, event, _ in revoked:
        handle = listener.get(task_id) if listener is not None else None
        if handle is not None:
            handle.apply(event)
    return [task_id for task_id, _, _ in revoked]


def restore_refused(
    listener: Listener,
    handles: Sequence[TaskHandle],
    refused: Sequence[str],
    previous: Sequence[TaskHandle | None],
) -> list[tuple[str, str]]:
    """Give the listener back the handles that calls refused for a reused id had replaced.

    ``refused`` has, per handle, the state of the task already holding its id ("" for a
    call that was sent); ``previous`` the handle the listener had for that id. Returns
    ``(task id, state)`` per refused call.
    """
    taken = [
        (handle, state, before)
        for handle, state, before in zip(handles, refused, previous, strict=True)
        if state
    ]
    give_back(listener, [handle for handle, _, _ in taken], [before for *_, before in taken])
    return [(handle.id, state) for handle, state, _ in taken]


def expected_handle(
    listener: Listener, task_id: str, name: str, queue: str, label: str, sent: float
) -> TaskHandle | None:
    """The handle already expecting this send, now its own handle; ``None`` if there is none.

    A handle made ahead for a task id (``Signature.freeze()``, ``app.expect()`` without a
    send stamp) that nothing was sent for yet follows the send this process makes with that
    id, rather than being replaced by a new handle and left waiting.
    """
    before = listener.get(task_id)
    if (
        before is None
        or before.done()
        or before.sent is not None
        or before.outcomes_after is not None
        or before.name != name
        or before.queue
    ):
        return None
    before.queue, before.label, before.sent = queue, label, sent
    return before


def give_back(
    listener: Listener, handles: Sequence[TaskHandle], previous: Sequence[TaskHandle | None]
) -> None:
    """Forget ``handles``, giving the listener back the handle each replaced, if any."""
    for handle, before in reversed(list(zip(handles, previous, strict=True))):
        if before is None:
            listener.forget(handle.id)
        else:
            listener.register(before)


def reused_ids(taken: Sequence[tuple[str, str]]) -> str:
    """The error for calls whose ``task_id`` another task holds, with that task's state."""
    final = {state.value for state in FINAL_STATES} | {"FINISHED"}
    reasons = [
        f"task id {task_id!r} was already used by a task that ended ({state})"
        if state in final
        else f"task id {task_id!r} belongs to a task that has not ended ({state}); follow "
        f"it with app.handle({task_id!r})"
        for task_id, state in taken
    ]
    return (
        f"{'; '.join(reasons)}. Nothing was sent for {'it' if len(taken) == 1 else 'them'}: "
        "task ids are single-use; leave task_id out for a fresh one"
    )
