"""Sending tasks from a worker: linked tasks, a chain's next step, tasks a task sends."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from nbtask.brokers import Publish, Transport
from nbtask.core.canvas import Call, Signature
from nbtask.core.handle import TaskHandle
from nbtask.core.outgoing import MessageBuilder
from nbtask.errors import NbtaskError
from nbtask.wire.events import Event, decode_event
from nbtask.wire.message import TaskMessage

__all__ = ["SubtaskPublisher", "WorkerHandle", "WorkerSender"]


class SubtaskPublisher:
    """Sends tasks from a worker process, each for the client whose task caused it.

    Parameters
    ----------
    transport
        Where the messages go.
    builder
        Builds and signs them.
    """

    def __init__(self, transport: Transport, builder: MessageBuilder) -> None:
        self.transport = transport
        self.builder = builder

    def publish_each(
        self, channel: str, sigs: Sequence[Signature]
    ) -> list[tuple[TaskMessage, Publish, str]]:
        """Send signatures (with their final arguments) for ``channel``'s client.

        Returns each one's message, its publish, and ``""`` or the state that refused it.
        A refused message was not queued (see ``Transport.publish``): its task's record
        was there before, and stays as it is: a chain step or a task revoked before this
        worker sent it, or one a rerun of its parent sends again while the first copy is
        queued or running.
        """
        built = [
            self.builder.build((sig.task, sig.args, sig.kwargs, sig.options), channel)
            for sig in sigs
        ]
        if not built:
            return []
        refused = self.transport.publish([publish for _, publish in built])
        return [
            (message, publish, why) for (message, publish), why in zip(built, refused, strict=True)
        ]


class WorkerSender:
    """Sends tasks from inside a running task, to the same client, through this worker.

    The client can re-attach to the tasks it sends by id. Waiting on them here is refused
    (``get()`` inside a task) unless asked for with ``disable_sync_subtasks=False``: then
    the handle follows the client's event channel itself while it waits.

    Parameters
    ----------
    publisher
        Sends them.
    message
        The running task's: they are its children, for its client.
    send
        Sends signatures for a client, giving their messages, and runs the owed follow-ups
        of one its record refused (revoked ahead: its errbacks, as a chain's later step's;
        see :meth:`FollowUps.send <nbtask.worker.follow_ups.FollowUps.send>`).
    """

    def __init__(
        self,
        publisher: SubtaskPublisher,
        message: TaskMessage,
        send: Callable[[str, Sequence[Signature]], list[TaskMessage]],
    ) -> None:
        self._publisher = publisher
        self._message = message
        self._send = send

    def send_batch(
        self, calls: Sequence[Call], *, on_event: Callable[[Event], None] | None = None
    ) -> list[TaskHandle]:
        """Send several calls in one round trip, as children of the running task.

        A handle here follows its task only while the running task waits on it (``get()``
        with ``disable_sync_subtasks=False``): ``on_event`` is called then, on that thread.
        """
        message = self._message
        family = {"parent_id": message.id, "root_id": message.root_id}
        sigs = [
            Signature(task, tuple(args), kwargs, {**options, **family})
            for task, args, kwargs, options in calls
        ]
        sent = self._send(message.client, sigs)
        handles = [self.expect(step.id, step.name, step.run[1]) for step in sent]
        if on_event is not None:
            for handle in handles:
                handle.on_event(on_event)
        return handles

    def expect(self, task_id: str, name: str, sent: float | None = None) -> TaskHandle:
        """A handle that follows the task only while someone waits on it."""
        return WorkerHandle(self._publisher, self._message.client, task_id, name, sent)


class WorkerHandle(TaskHandle):
    """A handle inside a worker: no listener thread feeds it, so waiting reads events."""

    def __init__(
        self,
        publisher: SubtaskPublisher,
        channel: str,
        task_id: str,
        name: str,
        sent: float | None = None,
    ) -> None:
        super().__init__(None, task_id, name, sent=sent)
        self._transport = publisher.transport
        self._signer = publisher.builder.signer
        self._prefix = publisher.builder.settings.key_prefix
        self._channel = channel

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result by reading the client's event channel, then return it."""
        if not self.done():
            self._follow(timeout)
        return super().result(0)

    def _follow(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self._transport.store
        # From the channel's current end, then the store, in that order: an outcome that
        # lands in between is in the store; one after it arrives as an event.
        position = store.channel_end(self._channel)
        record = store.get_record(self.id)
        if record is not None and record.result:
            self._apply_raw(record.result)
        while not self.done():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            for _channel, entry_id, raw in self._transport.read_events(
                {self._channel: position}, block_seconds=min(left, 1.0)
            ):
                position = entry_id
                self._apply_raw(raw)

    def _apply_raw(self, raw: bytes) -> None:
        if not raw:
            return
        try:
            event, value = decode_event(self._signer, raw, self._transport.store.get_blob)
        except NbtaskError:
            return
        if event.task_id == self.id and event.not_for(self._prefix, self.sent) is None:
            self.apply(event, value)
