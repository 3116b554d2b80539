"""The client's handle on one task: a :class:`concurrent.futures.Future` with live state."""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

from nbtask._text import value_text
from nbtask.core.celery_result import CeleryResultNames
from nbtask.core.context import current_request
from nbtask.core.holding import is_holder_queue
from nbtask.core.outcome import FetchWatch, load_result
from nbtask.core.refs import ResultRef
from nbtask.core.task_events import TaskEvents
from nbtask.errors import (
    AppClosed,
    BrokerUnavailable,
    CellError,
    ConfigurationError,
    NbtaskError,
    ResultNotReady,
    SendUnconfirmed,
)
from nbtask.settings import MAX_SECONDS, is_finite_number
from nbtask.wire.events import FAILED_STATES, WAITING_STATES, Deferred, Event, EventType, State

__all__ = ["Client", "FetchWatch", "StartedBy", "TaskHandle", "refusing_handles"]

#: Why ``get(on_message=...)`` is refused, and what to use.
NO_ON_MESSAGE = (
    "get(on_message=...) is Celery's; nbtask's handle calls a callback with each event of "
    "the task instead: h.on_event(fn), or apply_async(..., on_event=fn) to miss none. What "
    "the task sets with self.update_state(state=..., meta=...) arrives as an event of type "
    "EventType.STATE (event.data['state'], event.data['meta']), its progress as PROGRESS, "
    "its end as SUCCESS, FAILURE, REVOKED or WORKER_LOST; then h.get(timeout=...) as usual"
)

#: Set while a notebook cell's variables are pickled: a handle does not travel into a cell.
_refused: contextvars.ContextVar[bool] = contextvars.ContextVar("nbtask_no_handles", default=False)


@contextlib.contextmanager
def refusing_handles() -> Iterator[None]:
    """Within the block, pickling a :class:`TaskHandle` raises :class:`CellError`.

    A ``%%task`` cell's variables are pickled in it: a handle there would arrive as a
    bare task id, without ``get()`` or ``state``.
    """
    token = _refused.set(True)
    try:
        yield
    finally:
        _refused.reset(token)


#: How long ``get()`` waits for a task's events before it reads the broker's answers to
#: the sends of its thread (see :meth:`TaskHandle.result`): a no-op's result comes in
#: about a millisecond; an undelivered task fails this much later than at once.
_SETTLE_AFTER = 0.05


class StartedBy(NamedTuple):
    """The run of a ``STARTED`` task, as its events named it: what its handle asks about."""

    task_id: str
    #: The host and process id of the worker process that runs it (a worker's child).
    hostname: str
    pid: int
    #: When that run began (epoch seconds, its worker's clock); ``None`` if not known.
    began: float | None = None
    #: Whether the task was retried to a queue its events did not name (a worker of an
    #: older nbtask): its message may be on another queue than the handle's.
    queue_unsure: bool = False


class Client(Protocol):
    """What a handle reaches its client through (an :class:`~nbtask.App`)."""

    #: Shows the progress of a large result's fetch, if set.
    fetch_watch: FetchWatch | None

    def revoke(
        self,
        task_id: str,
        *,
        terminate: bool = False,
        grace: float = 5.0,
        signal: str | int = "SIGTERM",
    ) -> bool:
        """Revoke a task; see :meth:`nbtask.App.revoke`."""

    def waiting_reason(self, queue: str, started_by: StartedBy | None = None) -> str | None:
        """Why a task on ``queue`` waits, if known (``App.waiting_reason``)."""

    def moved_to(self, task_id: str, queue: str) -> str | None:
        """The queue a task was moved to off a gone process's own ``queue`` (``App.moved_to``)."""

    def flush(self) -> None:
        """Wait for the broker's confirms of this thread's tasks (``App.flush``)."""

    def wait_for(
        self,
        handle: TaskHandle,
        timeout: float | None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Read the client's events on this thread until ``handle`` is done or ``timeout``.

        Or until ``until()`` is true. May return earlier, the handle not done (when this
        thread cannot read).
        """


class TaskHandle(CeleryResultNames, TaskEvents):
    """A task that was sent; updated by the app's listener thread as events arrive.

    It is a :class:`concurrent.futures.Future`, so ``result()``, ``exception()``,
    ``done()``, ``add_done_callback()``, :func:`concurrent.futures.wait` and
    :func:`asyncio.wrap_future` work, with the ``Future``'s meanings: ``running()`` while
    a worker runs the task, and a revoked task's handle is ``cancelled()``, its ``result()``
    and ``exception()`` raising :class:`~nbtask.TaskRevoked`, a ``CancelledError``
    (:attr:`error` returns it instead). Done callbacks run on the thread reading the
    client's events (its listener thread, or a thread waiting in :meth:`get`), as do
    :meth:`on_event` callbacks, which see every event of the task as it arrives.
    Celery's ``AsyncResult`` names work too (``status``, ``task_id``, ``traceback``,
    ``revoke()``, ``wait()``, ``date_done``; see
    :class:`~nbtask.core.celery_result.CeleryResultNames`).

    Attributes
    ----------
    id : str
        The task id, usable with ``app.handle(id)`` from any process.
    name : str
        The task's registered name.
    queue : str
        The queue it was sent to (empty when not known, e.g. a chain's later step); after
        a retry, the queue the retry sent it to (``self.retry(queue=...)`` may name another).
        Work sent to a worker process's own queue (where a kept value is held) and moved
        off it when that process died names the queue it was moved to once
        :attr:`waiting_reason` was asked (views ask it), as its record does (unsigned: only
        if it names ``fallback_queue``, where its signed message goes, when that is known).
    label : str
        How the call is named on screen (``apply_async(label=...)``), empty if unnamed.
    sent : float or None
        The send the task's events name, signed in its message (its ``created``, or for
        a chain's later step, sent by a worker, the time its chain stamped): only events
        naming it are taken (a replayed event of an earlier task with the same id is
        not). ``None`` where it is not known (a ``link`` followed with ``app.expect``).
    """

    def __init__(
        self,
        app: Client | None,
        task_id: str,
        name: str,
        queue: str = "",
        label: str = "",
        *,
        sent: float | None = None,
    ) -> None:
        super().__init__(task_id, name)
        self.app = app
        self.sent = sent
        #: Set on a handle re-attached by id (see nbtask.client.reattach), whose send is
        #: not known for sure: no outcome made before this time (epoch seconds) is taken.
        self.outcomes_after: float | None = None
        self.queue = queue
        self.label = label
        #: The previous step's handle, for a chain's later steps.
        self.parent: TaskHandle | None = None
        self._loading = threading.Lock()
        self._loaded: tuple[Any] | None = None
        self._closed_note: str | None = None  # why nothing follows it any more (AppClosed)
        #: A retry's event named no queue (see :attr:`StartedBy.queue_unsure`).
        self._queue_unsure = False
        self.fallback_queue = ""  # where a move sends it, as signed (set by its sender)

    @property
    def info(self) -> dict[str, Any]:
        """Details from the worker: ``worker`` (host), ``pid``, retry reason, error.

        While the task waits for a worker, ``waiting`` says why (:attr:`waiting_reason`).
        Unlike Celery's ``info``, never the return value: that is :meth:`result`.
        """
        waiting = self.waiting_reason
        return {**self._info, "waiting": waiting} if waiting else dict(self._info)

    @property
    def waiting_reason(self) -> str | None:
        """Why the task has not started, or may not end, when nbtask can tell; else ``None``.

        While the task is ``PENDING`` (or waits for its retry) and no live worker consumes
        its queue (the one its retry named), this reads
        ``"no live worker consumes queue 'gpu'"``: the task waits, queued, until a worker
        of that queue starts (``nbtask worker -Q gpu``), and then this is ``None`` again.
        While it is ``STARTED`` by a worker process that is gone (a child killed, its
        worker alive; or a worker that stopped sending heartbeats: killed, its machine
        gone), it says so and what settles the task. It goes by the workers' registry as
        read at most every few seconds (no broker round trip per look), and so is the
        task's record while its process is gone. Work that waited on a gone process's own
        queue and was moved to another (see :attr:`queue`) is said of that queue, which
        this looks up in the task's record, read as rarely. ``None`` once the task ended.
        """
        if self.app is None or not self.queue or self.done():
            return None
        if is_holder_queue(self.queue):
            # Work waiting on a process's own queue is moved when that process is gone,
            # and no event says so: its (unsigned) record names the queue it went to.
            moved = self.app.moved_to(self.id, self.queue)
            if moved and self.fallback_queue in ("", moved):
                self._now_on(moved)
        if self._task_state is State.STARTED:
            host, pid = self._info.get("worker"), self._info.get("pid")
            if isinstance(host, str) and isinstance(pid, int):
                run = StartedBy(self.id, host, pid, self._run_began, self._queue_unsure)
                return self.app.waiting_reason(self.queue, run)
            return None
        if self._task_state not in WAITING_STATES:
            return None
        return self.app.waiting_reason(self.queue)

    def _apply(self, event: Event) -> None:
        super()._apply(event)
        if event.type is EventType.RETRY:
            # Its signed event names where the retry waits and runs: the handle's queue
            # from now on (what it waits for, who settles it if its worker dies).
            queue = event.data.get("queue")
            if isinstance(queue, str) and queue:
                # retry(queue=...) sends it on with no fallback: not known from now on.
                self.fallback_queue = self.fallback_queue if queue == self.queue else ""
                self._now_on(queue)
            else:
                self._queue_unsure = True

    def _now_on(self, queue: str) -> None:
        """The task waits and runs on ``queue`` from now on (retried, or moved there)."""
        self.queue, self._queue_unsure = queue, False

    def ready(self) -> bool:
        """True once the task reached a final state."""
        return self.done()

    def successful(self) -> bool:
        """True if the task finished with a result."""
        return self._task_state is State.SUCCESS

    def failed(self) -> bool:
        """True if the task ended ``FAILURE`` (it raised) or ``WORKER_LOST``.

        As Celery's ``failed()``, false for a revoked task (``REVOKED``: cancelled, revoked
        or expired), which neither :meth:`successful` nor failed; a lost worker is Celery's
        ``WorkerLostError``, a ``FAILURE``.
        """
        return self.done() and self._task_state in FAILED_STATES

    def get(
        self,
        timeout: float | None = None,
        *,
        propagate: bool = True,
        disable_sync_subtasks: bool = True,
        interval: float | None = None,
        no_ack: bool = True,
        follow_parents: bool = True,
        on_message: Callable[[dict[str, Any]], object] | None = None,
    ) -> Any:
        """Wait for the result, up to ``timeout`` seconds.

        Inside a task running on a worker this refuses to wait (a worker slot blocked on
        another task can deadlock the pool); chain the tasks instead, or pass
        ``disable_sync_subtasks=False`` if you are sure. A task run here with
        ``task.apply()`` waits, as its caller would.

        Parameters
        ----------
        timeout
            Seconds to wait at most; ``None`` waits until the task ends.
        propagate
            Raise the task's failure (the default); ``False`` returns the exception
            instead of raising it.
        disable_sync_subtasks
            Refuse to wait inside a task running on a worker (the default).
        interval, no_ack, follow_parents
            Celery's, taken and unused: the outcome arrives as a message, so nothing
            polls, acknowledges or walks the parents' results.
        on_message
            Celery's, refused (``ConfigurationError`` saying what to use): a task's
            events go to ``h.on_event(fn)`` or ``apply_async(..., on_event=fn)``.

        Returns
        -------
        Any
            The task's return value (or, with ``propagate=False``, its exception).

        Raises
        ------
        Exception
            The task raised: its own exception type (``KeyError``...) when it travelled
            and loads here, with ``__cause__`` a :class:`~nbtask.errors.RemoteError`
            holding the worker's traceback; else that ``RemoteError`` itself.
        TaskRevoked
            The task was revoked or cancelled (also a ``concurrent.futures.CancelledError``).
        WorkerLost
            The worker running it died and it was not run again.
        TimeLimitExceeded
            It ran past its hard time limit and its process was killed.
        AppClosed
            Its app was closed before the task ended (the task runs on).
        TimeoutError
            The task is not done after ``timeout`` seconds (it keeps running).
        RuntimeError
            Called inside a task on a worker without ``disable_sync_subtasks=False``.
        ConfigurationError
            ``on_message`` was given.
        BlobError, SerializationError
            The result cannot be loaded here (see :meth:`result`).
        """
        del interval, no_ack, follow_parents  # Celery's polling backends' options
        if on_message is not None:
            raise ConfigurationError(NO_ON_MESSAGE)
        request = current_request()
        if disable_sync_subtasks and request is not None and request.in_worker:
            raise RuntimeError(
                "never wait for a task's result inside another task: the worker slot blocks "
                "and the pool can deadlock. Chain them instead: (first.s(x) | second.s()).delay()"
            )
        try:
            return self.result(timeout)
        except KeyboardInterrupt:
            # Ctrl-C while waiting (the task runs on, as Celery's): the traceback ends at
            # this call, not in the frames that were reading the client's events.
            raise KeyboardInterrupt from None
        except concurrent.futures.TimeoutError:
            waiting = self.waiting_reason
            why = f" (waiting: {waiting})" if waiting else ""
            raise TimeoutError(
                f"task {self.name}[{self.id}] is still {self.state} after {timeout} s{why}"
            ) from None
        except BaseException as exc:
            if not propagate:
                return self.error
            if self.done() and exc is self.error:
                # The task's own failure: its traceback (and a second get()'s) starts at
                # this call, without the frames of concurrent.futures' wait; the worker's
                # is its __cause__.
                raise exc.with_traceback(None) from exc.__cause__
            raise

    def result(self, timeout: float | None = None) -> Any:
        """The task's result (see :class:`concurrent.futures.Future`).

        A large result sent out of band is read from the store here, on the asking
        thread, the first time it is asked for.

        Raises
        ------
        BlobError
            The result's blobs expired or were altered in the store.
        SerializationError
            The result needs a class this process cannot import, or does not rebuild here.
        ConfigurationError
            ``timeout`` is neither ``None`` nor a number of seconds, at most 1e9.
        """
        # Past about 9.2e9 s a wait raises OverflowError; 1e9 is the settings' own bound.
        if timeout is not None and not (is_finite_number(timeout) and timeout <= MAX_SECONDS):
            raise ConfigurationError(
                f"timeout={value_text(timeout)} is not a number of seconds up to "
                f"{MAX_SECONDS:.0e}; give seconds, or None to wait until the task ends"
            )
        if not self.done() and self.app is not None:
            # This thread reads the events itself when no other thread is reading: its
            # result then reaches it without a hop through the listener thread.
            deadline = None if timeout is None else time.monotonic() + timeout
            # Its message may still await the broker's answer (sent by this thread just
            # now). Its events are waited for first, a short while: a quick task's come
            # after that answer, which is then read without waiting for it (the thread
            # sleeps once, for its result, not also for the answer). Then the answer is
            # read, so an undelivered task fails, and one the broker never answered for
            # is said to be in doubt, before the thread waits any longer.
            first = _SETTLE_AFTER if timeout is None else min(timeout, _SETTLE_AFTER)
            self.app.wait_for(self, first)
            try:
                self.app.flush()
            except SendUnconfirmed as exc:
                if self.id in exc.task_ids:
                    raise
            except BrokerUnavailable:
                pass
            if not self.done():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.app.wait_for(self, left)
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        self._raise_if_unfollowed()
        try:
            value = super().result(timeout)
        except concurrent.futures.TimeoutError:
            self._raise_if_unfollowed()  # woken by its app's close
            raise
        if not isinstance(value, Deferred):
            return value
        with self._loading:
            if self._loaded is None:
                watch = self.app.fetch_watch if self.app is not None else None
                self._loaded = (load_result(value, self.name, self.id, watch),)
            return self._loaded[0]

    def refusal(self, event: Event, prefix: str) -> str | None:
        """Why ``event`` is not about this send of the task by app ``prefix``, if so.

        A handle re-attached by id (:attr:`outcomes_after` set) does not know its send for
        sure: it moves on to a later send that a signed event names (someone with broker
        access can put back only genuine events, so only earlier ones), and takes no
        outcome made before :attr:`outcomes_after`.
        """
        if self.outcomes_after is None:
            return event.not_for(prefix, self.sent)
        why = event.not_for(prefix, None) or event.not_after(self.outcomes_after)
        if why is not None:
            return why
        when = event.run[1]
        if self.sent is None or (when is not None and when > self.sent):
            self.sent = when
            return None
        return event.not_for(prefix, self.sent)

    def unfollowed(self, app_name: str) -> None:
        """Its app was closed: nothing will end this handle any more, so waiting raises.

        Threads waiting for its result wake and raise :class:`~nbtask.errors.AppClosed`;
        the task itself runs on.
        """
        with self._condition:  # concurrent.futures.Future's: what result() waits on
            if self.done():
                return
            self._closed_note = (
                f"app {app_name!r} was closed while task {self.name}[{self.id}] was "
                f"{self.state}: the task runs on, but this handle is no longer updated. "
                f"Follow it from an open app: App(...).handle({self.id!r})"
            )
            self._condition.notify_all()

    def _raise_if_unfollowed(self) -> None:
        note = self._closed_note
        if note is not None and not self.done():
            raise AppClosed(note)

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        """A handle passed as an argument travels as its task id: the worker reads the result.

        Its result is not fetched here, however large; only that send's is taken (see
        :class:`~nbtask.core.refs.ResultRef`). Only a task that succeeded can stand for its
        result: for one still running, chain the tasks instead.
        """
        if _refused.get():
            raise CellError(f"the handle of task {self.name}[{self.id}]")
        if not self.done():
            raise ResultNotReady(
                f"task {self.name}[{self.id}] is still {self.state}: its handle can be an "
                "argument only once it succeeded. Chain the tasks instead, and the result "
                "goes from worker to worker: (first.s(...) | second.s()).delay()"
            )
        if self._task_state is not State.SUCCESS:
            raise ResultNotReady(
                f"task {self.name}[{self.id}] ended {self._task_state.value}: it has no "
                "result to pass as an argument"
            )
        return ResultRef(self.id, self.name, self.sent).__reduce_ex__(protocol)

    def cancel(self) -> bool:
        """Revoke the task: a queued one never runs, a running one is interrupted.

        Returns whether it was revoked (or an interrupt was sent); the handle reads
        ``REVOKED`` once the worker confirms.
        """
        return False if self.done() else self.send_revoke(terminate=True, grace=5.0)

    def send_revoke(self, *, terminate: bool, grace: float, signal: str | int = "SIGTERM") -> bool:
        """:meth:`nbtask.App.revoke` of this task, through the app that follows it."""
        if self.app is None:
            raise NbtaskError(
                f"task {self.id} was sent from inside another task; revoke it from a client "
                "with app.revoke(task_id, terminate=True)"
            )
        return self.app.revoke(self.id, terminate=terminate, grace=grace, signal=signal)

    def __repr__(self) -> str:
        waiting = self.waiting_reason
        why = f", waiting: {waiting}" if waiting else ""
        return f"<TaskHandle {self.name}[{self.id}] {self.state}{why}>"
