"""Sending tasks from inside a running task, through the worker that runs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nbtask.canvas import Signature
from nbtask.handle import TaskHandle

if TYPE_CHECKING:
    from nbtask.child import Child
    from nbtask.message import TaskMessage
    from nbtask.task import Task

__all__ = ["WorkerSender"]


class WorkerSender:
    """Sends tasks from inside a running task, to the same client, through this worker.

    The handles it returns are not followed here (a task must not wait for another);
    the client can re-attach to them by id.
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
        return [
            TaskHandle(None, task_id, sig.task.name)
            for sig, task_id in zip(sigs, self._child.publish(message.client, sigs), strict=True)
        ]

    def expect(self, task_id: str, name: str) -> TaskHandle:
        """A handle nobody follows here."""
        return TaskHandle(None, task_id, name)
