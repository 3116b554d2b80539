"""Signatures and workflows: ``task.s()``, ``task.si()``, chains (``a.s() | b.s()``), groups.

Also who sends them: a :class:`Sender` (an :class:`~nbtask.App`, or the worker running
the current task).
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, Protocol

from nbtask.core.bound import Bound
from nbtask.core.canvas_refusals import NO_CHORD, chord, not_a_signature
from nbtask.core.celery_canvas import CeleryGroupNames, CelerySignatureNames
from nbtask.core.handle import TaskHandle
from nbtask.core.options import new_task_id, seconds_from_now
from nbtask.errors import ConfigurationError
from nbtask.wire.events import Event

__all__ = [
    "NO_CHORD",
    "Call",
    "Callbacks",
    "Chain",
    "Group",
    "GroupHandle",
    "Sender",
    "Signable",
    "Signature",
    "chain",
    "chord",
    "current_sender",
    "group",
    "sending_through",
]


class Signable(Protocol):
    """A task, as a signature needs it (:class:`~nbtask.Task` is one)."""

    @property
    def name(self) -> str:
        """The registered name."""

    @property
    def queue(self) -> str | None:
        """The task's own queue, if any."""

    # Called with the keywords of :meth:`nbtask.Task.apply_async` and of its
    # ``send_options``: typed loosely here, checked by the task itself.
    @property
    def apply_async(self) -> Callable[..., TaskHandle]:
        """Send the task."""

    @property
    def send_options(self) -> Callable[..., dict[str, Any]]:
        """Check ``apply_async`` options and turn them into message options."""

    def check_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], requires: Sequence[str] | None = None
    ) -> None:
        """Raise ``TypeError`` unless the task accepts these arguments."""

    def sender(self) -> Sender:
        """What sends this task now: its app, or the worker running the current task."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here (a direct call)."""


#: One call to send: ``(task, args, kwargs, message options)``.
Call = tuple[Signable, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]


class Sender(Protocol):
    """What sends tasks: an :class:`~nbtask.App`, or a worker on behalf of a running task."""

    def send_batch(
        self, calls: Sequence[Call], *, on_event: Callable[[Event], None] | None = None
    ) -> list[TaskHandle]:
        """Send several calls in one round trip; ``on_event`` is attached to each handle first."""

    def expect(self, task_id: str, name: str, sent: float | None = None) -> TaskHandle:
        """A handle for a task someone else will send, as the send ``sent`` if known."""


_sender: contextvars.ContextVar[Sender | None] = contextvars.ContextVar(
    "nbtask_sender", default=None
)


def current_sender() -> Sender | None:
    """Who sends tasks from inside the task running now (``None`` outside a task)."""
    return _sender.get()


def sending_through(sender: Sender) -> Bound[Sender | None]:
    """Tasks sent inside the ``with`` block go through ``sender`` (a worker, for a task)."""
    return Bound(_sender, sender)


@dataclasses.dataclass(frozen=True)
class Signature(CelerySignatureNames):
    """A task with (some of) its arguments and options, to send later.

    Arguments given when it is sent come first, then the signature's own, as in Celery:
    ``add.s(2).delay(8)`` runs ``add(8, 2)``, and in a chain each result is passed as the
    next task's first argument, unless the signature is immutable (``task.si()``).
    """

    task: Signable
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    immutable: bool = False
    #: Options already converted by :meth:`for_worker` (message options, not call options).
    prepared: bool = False

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Add :meth:`~nbtask.Task.apply_async` options to the signature itself; return it.

        As Celery's: ``sig.set(queue="q")`` alone is enough. ``immutable=True`` makes it
        an immutable one (as ``task.si()``), ``False`` a partial one again.
        """
        if immutable is not None:
            object.__setattr__(self, "immutable", bool(immutable))
        object.__setattr__(self, "options", {**self.options, **options})
        return self

    def with_options(self, **options: Any) -> Signature:
        """A copy with these options added; the signature itself is left as it is."""
        return dataclasses.replace(self, options={**self.options, **options})

    def extended(self, key: str, more: object) -> Signature:
        """A copy whose ``link`` or ``link_error`` list has ``more`` added after its own."""
        return self.with_options(**{key: [*listed(self.options.get(key)), *listed(more)]})

    def for_worker(self, **extra: Any) -> Signature:
        """A copy whose options are checked and converted now, for a worker to send later.

        Everything becomes absolute here (``expires``, ``eta``) except ``countdown``,
        which counts from when the worker sends it.
        """
        if self.prepared:
            return dataclasses.replace(self, options={**self.options, **extra})
        options = dict(self.options)
        countdown = options.pop("countdown", None)
        converted = self.task.send_options(**options)
        if countdown is not None:
            converted["countdown"] = seconds_from_now("countdown", countdown)
        return dataclasses.replace(self, options={**converted, **extra}, prepared=True)

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Send it, with extra arguments."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> TaskHandle:
        """Send it, with extra arguments and :meth:`~nbtask.Task.apply_async` options.

        Parameters
        ----------
        args, kwargs
            Extra arguments: ``args`` go before the signature's own (unless it is
            immutable, which ignores them); ``kwargs`` over its own.
        **options
            Those of :meth:`~nbtask.Task.apply_async`, over the signature's;
            ``on_event=`` attaches a callback for the task's events before it is sent.
        """
        call_args = self.args if self.immutable else (*args, *self.args)
        merged = {**self.kwargs, **(kwargs or {})}
        return self.task.apply_async(call_args, merged, **{**self.options, **options})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here and now, as a direct call of it (Celery's ``sig(*args)``).

        Arguments are merged as :meth:`apply_async` merges them; nothing is sent.
        """
        call_args = self.args if self.immutable else (*args, *self.args)
        return self.task(*call_args, **{**self.kwargs, **kwargs})

    def __or__(self, other: Signature | Chain) -> Chain:
        return Chain((self,)) | other

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task.name}{'!' if self.immutable else ''}({', '.join(parts)})"


def listed(value: object) -> list[Any]:
    """A ``link``/``link_error`` option as a list: ``None``, one signature, or several."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Signatures to send when the task succeeds (``link``) or fails (``link_error``)."""

    link: tuple[Signature, ...] = ()
    link_error: tuple[Signature, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.link or self.link_error)


@dataclasses.dataclass(frozen=True)
class Chain:
    """Tasks run one after the other, each getting the previous one's result.

    The workers send each next step themselves when a step succeeds; if a step fails, the
    later steps never run and their handles fail with the same error.
    """

    steps: tuple[Signature, ...]
    #: What it is, for the canvas's errors (see nbtask.core.canvas_refusals).
    canvas_kind: ClassVar[str] = "chain"

    def __or__(self, other: Signature | Chain) -> Chain:
        more = other.steps if isinstance(other, Chain) else (other,)
        for step in more:
            if not isinstance(step, Signature):
                raise not_a_signature("chain", step, first=not self.steps)
        return Chain(self.steps + more)

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Start the chain; extra arguments go to the first step."""
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Celery's ``chain(...)()``: the same as :meth:`delay`."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> TaskHandle:
        """Start the chain and return the last step's handle (``.parent`` walks back).

        Parameters
        ----------
        args, kwargs
            Extra arguments of the first step, as for :meth:`Signature.apply_async`.
        **options
            As Celery's: ``link`` is added to the last step's links, ``link_error`` to
            every step's errbacks (whichever step fails calls it, once), ``task_id`` is
            the last step's id; the others (``countdown``, ``eta``, ``queue``...) are
            the first step's :meth:`~nbtask.Task.apply_async` options.
        """
        if not self.steps:
            raise ConfigurationError("an empty chain has nothing to run")
        steps = self._with_options(options)
        self._check_later_steps()
        ids = [step.options.get("task_id") or new_task_id() for step in steps]
        root = ids[0]
        # The later steps are sent by workers: the send their events name is stamped here,
        # signed with the chain, so a replayed event of an earlier step with the same id
        # is told apart (see nbtask.wire.events.Run).
        sent = time.time()
        following: Signature | None = None
        for step, task_id in zip(reversed(steps[1:]), reversed(ids[1:]), strict=True):
            prepared = step.for_worker(task_id=task_id, root_id=root, sent=sent)
            if following is not None:
                # Beside the step's own links and errbacks, as Celery adds the next step.
                own: Callbacks = prepared.options.get("callbacks") or Callbacks()
                callbacks = Callbacks((*own.link, following), own.link_error)
                prepared = prepared.for_worker(callbacks=callbacks)
            following = prepared
        app = steps[0].task.sender()
        later = zip(steps[1:], ids[1:], strict=True)
        handles = [app.expect(task_id, step.task.name, sent) for step, task_id in later]
        first = steps[0].with_options(task_id=root)
        if following is not None:
            first = first.with_options(link=[*listed(first.options.get("link")), following])
        head = first.apply_async(args, kwargs)
        previous = head
        for handle in handles:
            handle.parent = previous
            previous = handle
        return previous

    def _with_options(self, options: Mapping[str, Any]) -> list[Signature]:
        """The steps with the chain's own ``apply_async`` options put where Celery puts them."""
        rest = dict(options)
        link, link_error = rest.pop("link", None), rest.pop("link_error", None)
        last_id = rest.pop("task_id", None)
        steps = list(self.steps)
        if link_error is not None:
            steps = [step.extended("link_error", link_error) for step in steps]
        if link is not None:
            steps[-1] = steps[-1].extended("link", link)
        if last_id is not None:
            steps[-1] = steps[-1].with_options(task_id=last_id)
        if rest:
            steps[0] = steps[0].with_options(**rest)
        return steps

    def _check_later_steps(self) -> None:
        """Refuse, before anything is sent, a later step that its arguments do not fit.

        Each gets the previous step's result first, unless immutable (``task.si()``): a
        step that cannot take it would fail on a worker once the earlier steps ran. The
        first step is checked as any call, when it is sent.
        """
        for number, step in enumerate(self.steps[1:], start=2):
            args = step.args if step.immutable else (_PREVIOUS_RESULT, *step.args)
            try:
                step.task.check_arguments(args, step.kwargs, step.options.get("requires"))
            except TypeError as exc:
                given = "" if step.immutable else f", given step {number - 1}'s result first"
                raise TypeError(
                    f"chain step {number} of {len(self.steps)} ({step!r}{given}): {exc}"
                ) from None


#: Stands for a step's result when the next step's arguments are checked: only how many
#: arguments a call has counts, not their values.
_PREVIOUS_RESULT = object()


def chain(*steps: Signature | Chain) -> Chain:
    """``chain(a.s(), b.s())``, the same as ``a.s() | b.s()``.

    Parameters
    ----------
    *steps
        Signatures or chains, in the order they run.
    """
    result = Chain(())
    for step in steps:
        result = result | step
    return result


@dataclasses.dataclass(frozen=True)
class Group:
    """Tasks sent together to run in parallel."""

    tasks: tuple[Signature, ...]
    #: What it is, for the canvas's errors (see nbtask.core.canvas_refusals).
    canvas_kind: ClassVar[str] = "group"

    def delay(self, *args: Any, **kwargs: Any) -> GroupHandle:
        """Send every task, in one round trip; extra arguments go to each (Celery's)."""
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **options: Any) -> GroupHandle:
        """Celery's ``group(...)(*args, **options)``: ``apply_async(args, **options)``."""
        return self.apply_async(args, **options)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> GroupHandle:
        """Send every task, in one round trip; return their :class:`GroupHandle`.

        Parameters
        ----------
        args, kwargs
            Extra arguments of every task, merged as :meth:`Signature.apply_async` merges
            them: ``group([add.s(2), add.s(4)]).delay(10)`` runs ``add(10, 2)`` and
            ``add(10, 4)``.
        **options
            :meth:`~nbtask.Task.apply_async` options of every task, over each one's own
            (``countdown``, ``eta``, ``queue``...); ``task_id`` is the group's id.
            ``link`` and ``link_error`` are refused with ``TypeError``, as Celery's.
        """
        if options.get("link") is not None:
            raise TypeError(
                "Cannot add link to group: a task after the whole group is Celery's chord, "
                "which nbtask does not have; send it with the group's results instead: "
                "task.delay(group([...]).delay().get())"
            )
        if options.get("link_error") is not None:
            raise TypeError("Cannot add link_error to group: do that on individual tasks")
        options = {k: v for k, v in options.items() if k not in ("link", "link_error")}
        group_id = options.pop("task_id", None) or new_task_id()
        if not self.tasks:
            return GroupHandle([], group_id)
        app = self.tasks[0].task.sender()
        calls = []
        for sig in self.tasks:
            call_args = sig.args if sig.immutable else (*args, *sig.args)
            call_kwargs = {**sig.kwargs, **(kwargs or {})}
            sig_options = {**sig.options, **options}
            sig.task.check_arguments(call_args, call_kwargs, sig_options.get("requires"))
            calls.append((sig.task, call_args, call_kwargs, sig.task.send_options(**sig_options)))
        return GroupHandle(app.send_batch(calls), group_id)

    def __or__(self, other: object) -> NoReturn:
        raise ConfigurationError(NO_CHORD)


def group(*tasks: Signature | Iterable[Signature]) -> Group:
    """``group(add.s(1, 1), add.s(2, 2))`` or ``group([...])``: run tasks in parallel.

    Parameters
    ----------
    *tasks
        Signatures, one per task; or, as Celery's, one iterable of them.
    """
    if len(tasks) == 1 and not isinstance(tasks[0], Signature):
        items: tuple[object, ...] = tuple(tasks[0])
    else:
        items = tasks
    for item in items:
        if not isinstance(item, Signature):
            raise not_a_signature("group", item)
    return Group(tuple(t for t in items if isinstance(t, Signature)))


class GroupHandle(CeleryGroupNames):
    """The handles of a group's tasks, gathered.

    Parameters
    ----------
    handles
        One :class:`~nbtask.TaskHandle` per task, in the group's order.
    group_id
        The group's id (Celery's ``GroupResult.id``); a new one by default.
    """

    def __init__(self, handles: Sequence[TaskHandle], group_id: str | None = None) -> None:
        self.handles = list(handles)
        self.id = group_id or new_task_id()

    def get(self, timeout: float | None = None, *, propagate: bool = True) -> list[Any]:
        """Every result, in order; raises the first error met.

        Parameters
        ----------
        timeout
            Seconds to wait for all of them at most; ``None`` waits until all end.
        propagate
            ``False`` (as :meth:`TaskHandle.get`): a failed task's exception takes its
            place in the list instead, and every task is waited for.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for handle in self.handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(handle.get(timeout=left, propagate=propagate))
        return results

    def ready(self) -> bool:
        """True once every task finished."""
        return all(h.ready() for h in self.handles)

    def successful(self) -> bool:
        """True once every task finished with a result."""
        return all(h.successful() for h in self.handles)

    def failed(self) -> bool:
        """True if a task failed (Celery's ``GroupResult.failed``: a revoked one has not)."""
        return any(h.failed() for h in self.handles)

    def completed_count(self) -> int:
        """How many tasks finished successfully."""
        return sum(1 for h in self.handles if h.successful())

    @property
    def progress(self) -> float:
        """Finished tasks over all tasks (1.0 for an empty group)."""
        if not self.handles:
            return 1.0
        return sum(1 for h in self.handles if h.ready()) / len(self.handles)

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[TaskHandle]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"<GroupHandle {sum(h.ready() for h in self.handles)}/{len(self.handles)} done>"
