"""The client's handle on one task: a :class:`concurrent.futures.Future` with live state."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nbtask.errors import RemoteError, TaskRevoked, WorkerLost
from nbtask.events import FINAL_STATES, Event, EventType, Progress, State

if TYPE_CHECKING:
    from nbtask.app import App

__all__ = ["TaskHandle"]


class TaskHandle(concurrent.futures.Future[Any]):
    """A task that was sent; updated by the app's listener thread as events arrive.

    It is a :class:`concurrent.futures.Future`, so ``result()``, ``exception()``,
    ``done()``, ``add_done_callback()``, :func:`concurrent.futures.wait` and
    :func:`asyncio.wrap_future` work. Done callbacks run on the listener thread.

    Attributes
    ----------
    id : str
        The task id, usable with ``app.handle(id)`` from any process.
    name : str
        The task's registered name.
    """

    def __init__(self, app: App, task_id: str, name: str) -> None:
        super().__init__()
        self.app = app
        self.id = task_id
        self.name = name
        self._task_state: State = State.PENDING
        self._progress: Progress | None = None
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._outputs: list[Event] = []
        self._last_seq = -1
        self._info: dict[str, Any] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    # State -------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The latest known state (``PENDING`` until the first event)."""
        return self._task_state

    @property
    def progress(self) -> Progress | None:
        """The latest progress report, if any."""
        return self._progress

    @property
    def stdout(self) -> str:
        """Everything the task printed so far."""
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        """Everything the task wrote to stderr so far."""
        return "".join(self._stderr)

    @property
    def outputs(self) -> list[Event]:
        """Output events in the order the task produced them: stdout, stderr, display."""
        return list(self._outputs)

    @property
    def info(self) -> dict[str, Any]:
        """Details from the worker: ``worker`` (host), ``pid``, retry reason, error."""
        return dict(self._info)

    def ready(self) -> bool:
        """True once the task reached a final state."""
        return self.done()

    def successful(self) -> bool:
        """True if the task finished with a result."""
        return self._task_state is State.SUCCESS

    def failed(self) -> bool:
        """True if the task finished without a result."""
        return self.done() and self._task_state is not State.SUCCESS

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> Any:
        """Wait for the result, up to ``timeout`` seconds.

        Raises
        ------
        TimeoutError
            The task is not done after ``timeout`` seconds (it keeps running).
        RemoteError
            The task raised; carries the original type name and remote traceback.
        """
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"task {self.name}[{self.id}] is still {self._task_state.value} after {timeout} s"
            ) from None
        except BaseException:
            if propagate:
                raise
            return self.exception(0)

    def on_event(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every later event (on the listener thread)."""
        self._listeners.append(callback)

    # Fed by the listener ----------------------------------------------------------------------
    def apply(self, event: Event, result: Any = None) -> None:
        """Apply one event; events older than the last one applied are ignored."""
        with self._lock:
            if self.done() or (event.seq and event.seq <= self._last_seq):
                return
            self._last_seq = max(self._last_seq, event.seq)
            self._apply(event)
        if event.state in FINAL_STATES:
            self._settle(event, result)
        for callback in list(self._listeners):
            callback(event)

    def _apply(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind is EventType.PROGRESS:
            self._progress = event.progress
        elif kind is EventType.STDOUT:
            self._stdout.append(str(data.get("text", "")))
            self._outputs.append(event)
        elif kind is EventType.STDERR:
            self._stderr.append(str(data.get("text", "")))
            self._outputs.append(event)
        elif kind is EventType.DISPLAY:
            self._outputs.append(event)
        if event.state is not None:
            self._task_state = event.state
        self._info.update({k: v for k, v in data.items() if k in ("worker", "pid", "reason")})

    def _settle(self, event: Event, result: Any) -> None:
        data = event.data
        if event.type is EventType.SUCCESS:
            self.set_result(result)
        elif event.type is EventType.REVOKED:
            self.set_exception(TaskRevoked(f"task {self.name}[{self.id}] was revoked"))
        elif event.type is EventType.WORKER_LOST:
            self.set_exception(
                WorkerLost(
                    f"the worker running task {self.name}[{self.id}] died "
                    f"({data.get('reason', 'no reason known')}); the task was not retried "
                    "because it is not acks_late"
                )
            )
        else:
            self.set_exception(
                RemoteError(
                    str(data.get("ename", "Exception")),
                    str(data.get("evalue", "")),
                    str(data.get("traceback", "")),
                    self.id,
                )
            )

    def cancel(self) -> bool:
        """Revoke the task if it has not started; return whether it was revoked."""
        if self.done():
            return False
        return self.app.revoke(self.id)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name}[{self.id}] {self._task_state.value}>"
