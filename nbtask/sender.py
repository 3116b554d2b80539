"""Sending tasks from inside a running task, through the worker that runs it."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nbtask.canvas import Signature
from nbtask.errors import NbtaskError
from nbtask.handle import TaskHandle
from nbtask.listener import decode_event

if TYPE_CHECKING:
    from nbtask.brokers import Broker
    from nbtask.child import Child
    from nbtask.envelope import Signer
    from nbtask.message import TaskMessage
    from nbtask.task import Task

__all__ = ["WorkerHandle", "WorkerSender"]


class WorkerSender:
    """Sends tasks from inside a running task, to the same client, through this worker.

    The client can re-attach to the tasks it sends by id. Waiting on them here is refused
    (``get()`` inside a task) unless asked for with ``disable_sync_subtasks=False``: then
    the handle follows the client's event channel itself while it waits.
    """

    def __init__(self, child: Child, message: TaskMessage) -> None:
        self._child = child
        self._message = message

    def send(
        self, task: Task, args: Sequence[Any], kwargs: Mapping[str, Any], options: Mapping[str, Any]
    ) -> TaskHandle:
        """Send one call."""
        return self.send_batch([(task, args, kwargs, options)])[0]

    def send_batch(
        self, calls: Sequence[tuple[Task, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[TaskHandle]:
        """Send several calls in one round trip, as children of the running task."""
        message = self._message
        family = {"parent_id": message.id, "root_id": message.root_id}
        sigs = [
            Signature(task, tuple(args), kwargs, {**options, **family})
            for task, args, kwargs, options in calls
        ]
        ids = self._child.publish(message.client, sigs)
        return [self.expect(task_id, sig.task.name) for sig, task_id in zip(sigs, ids, strict=True)]

    def expect(self, task_id: str, name: str) -> TaskHandle:
        """A handle that follows the task only while someone waits on it."""
        return WorkerHandle(
            self._child.broker, self._child.signer, self._message.client, task_id, name
        )


class WorkerHandle(TaskHandle):
    """A handle inside a worker: no listener thread feeds it, so waiting reads events."""

    def __init__(
        self, broker: Broker, signer: Signer, channel: str, task_id: str, name: str
    ) -> None:
        super().__init__(None, task_id, name)
        self._broker = broker
        self._signer = signer
        self._channel = channel

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result by reading the client's event channel, then return it."""
        if not self.done():
            self._follow(timeout)
        return super().result(0)

    def _follow(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # From the channel's current end, then the store, in that order: an outcome that
        # lands in between is in the store; one after it arrives as an event.
        position = self._broker.channel_end(self._channel)
        self._apply_stored()
        while not self.done():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            for _channel, entry_id, raw in self._broker.read_events(
                {self._channel: position}, block_seconds=min(left, 1.0)
            ):
                position = entry_id
                self._apply_raw(raw)

    def _apply_stored(self) -> None:
        stored = self._broker.get_record(self.id).get("result")
        if stored:
            self._apply_raw(stored)

    def _apply_raw(self, raw: bytes) -> None:
        if not raw:
            return
        try:
            event, value = decode_event(self._signer, raw)
        except NbtaskError:
            return
        if event.task_id == self.id:
            self.apply(event, value)
