"""The :class:`Task` base class: a unit of work, its options, and how it is sent.

What one call passes (arguments, times, callbacks) is checked in
:mod:`nbtask.core.call_checks`; what the task's own code calls while it runs (``request``,
``update_state``, ``retry``) and Celery's handlers are in :mod:`nbtask.core.task_running`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, SupportsIndex

from nbtask.core.call_checks import (
    call_arguments,
    check_fits,
    epoch,
    link_callbacks,
    positional_args,
    refuse_celery_options,
    run_signature,
)
from nbtask.core.canvas import Call, Sender, Signature, current_sender
from nbtask.core.celery_task import CeleryTaskNames
from nbtask.core.context import directly_called, entering_run, own_request, run_entering
from nbtask.core.datasets import data_queue, dataset_names
from nbtask.core.handle import TaskHandle
from nbtask.core.holding import is_holder_queue
from nbtask.core.named import reduced_by_name
from nbtask.core.options import (
    check_task_id,
    check_time_limits,
    class_options,
    positive,
    queue_name,
    seconds,
    time_at,
)
from nbtask.core.task_running import RunningTask
from nbtask.errors import ConfigurationError
from nbtask.wire.events import Event
from nbtask.wire.records import WorkerInfo

__all__ = ["Task", "TaskApp"]


class TaskApp(Sender, Protocol):
    """The app a task is registered on (an :class:`~nbtask.App`): sends it, and routes it."""

    def route(self, name: str) -> str | None:
        """The queue the app's routes give task ``name``, or ``None``."""

    def workers(self) -> Mapping[str, WorkerInfo]:
        """The live workers (read now): where kept values are held."""

    def sent_to(self, queue: str) -> bool:
        """Whether work the app sent to ``queue`` has not ended yet."""


class Task(RunningTask, CeleryTaskNames):
    """A unit of work that workers run; subclass it for custom task classes.

    ``@app.task`` makes a subclass whose ``run`` is the decorated function and returns
    its single instance. A worker process keeps one instance per task, so attributes set
    on ``self`` (a cached connection, a loaded model) survive from call to call, and so do
    they in the caller's process, where ``apply()`` runs the task on this same instance.
    Celery's names beyond nbtask's own: ``apply()`` runs the task here, as Celery's does;
    ``map``, ``starmap`` and ``chunks`` say what to do instead
    (:class:`~nbtask.core.celery_task.CeleryTaskNames`).
    """

    name: ClassVar[str] = ""
    queue: ClassVar[str | None] = None
    acks_late: ClassVar[bool] = False
    #: ``None`` follows the app's ``task_ignore_result`` setting.
    ignore_result: ClassVar[bool | None] = None
    expires: ClassVar[float | None] = None
    bind: ClassVar[bool] = False
    max_retries: ClassVar[int | None] = 3
    default_retry_delay: ClassVar[float] = 180.0
    retry_backoff: ClassVar[bool | float] = False
    retry_backoff_max: ClassVar[float] = 600.0
    retry_jitter: ClassVar[bool] = True
    autoretry_for: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Exceptions never retried automatically, even if ``autoretry_for`` lists a base class.
    dont_autoretry_for: ClassVar[tuple[type[BaseException], ...]] = ()
    #: The keywords an automatic retry passes to :meth:`retry` (``max_retries``,
    #: ``countdown``, ``eta``); a ``retry_backoff`` delay wins over ``countdown``.
    retry_kwargs: ClassVar[Mapping[str, Any]] = {}
    #: Expected exceptions: a failure with one is a FAILURE as any other, but the worker
    #: logs it in one line at INFO, without its traceback, instead of at ERROR.
    throws: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Tasks per second on one worker (parsed from ``"10/s"``, ``"100/m"``, ``"1000/h"``).
    rate_limit: ClassVar[float | None] = None
    time_limit: ClassVar[float | None] = None
    soft_time_limit: ClassVar[float | None] = None
    serializer: ClassVar[str] = "cloudpickle"
    #: ``None``: an ``acks_late`` task whose worker died is redelivered; ``False``: it
    #: fails with ``WorkerLost`` instead (Celery's behaviour without this option).
    reject_on_worker_lost: ClassVar[bool | None] = None
    #: ``False`` keeps no record at all in the result store (the client is still told).
    store_result: ClassVar[bool] = True
    #: Celery's: accepted, changes nothing. An ``ignore_result`` task's failure (state,
    #: error and traceback) is always stored; only a success's value is left out.
    store_errors_even_if_ignored: ClassVar[bool | None] = None
    #: Celery's: accepted, changes nothing. Every task reports ``STARTED`` when a worker
    #: begins it; the client is told at no cost beyond the event itself.
    track_started: ClassVar[bool] = True
    #: Named datasets the task receives from its worker as keyword arguments; it is sent
    #: only to workers holding them (see :mod:`nbtask.core.datasets`).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Check a call's arguments against ``run`` before it is sent (Celery's ``typing``),
    #: so a wrong call fails at once, in the caller, and nothing is sent.
    typing: ClassVar[bool] = True
    #: Whether what the worker's process writes to its file descriptors 1 and 2 while the
    #: task's code runs (``os.system``, a subprocess that does not capture its output, C
    #: code's ``printf``, ``faulthandler``) is the task's stdout and stderr, as a Jupyter
    #: kernel shows it in the running cell. ``%%task`` cells say so; otherwise it goes to
    #: the worker's log.
    output_descriptors: ClassVar[bool] = False
    #: Seconds the task runs before its ``started`` event goes out (``None``: the worker's
    #: half a millisecond). A run that ends sooner sends none: its final event says when it
    #: started, and the client makes its ``started`` from that.
    started_after: ClassVar[float | None] = None
    # Abstract classes (the app's Task base, user base classes) are never registered.
    abstract: ClassVar[bool] = True

    #: The app the task is registered on (``None`` for a task shipped to a worker).
    app: TaskApp | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Options a class body sets (a base class's rate_limit = "100/s") are checked and
        # converted as @app.task's are, when the class is made: a worker reads them as is.
        super().__init_subclass__(**kwargs)
        where = f"class {cls.__qualname__}"
        for name, value in class_options(cls.__dict__, where).items():
            type.__setattr__(cls, name, value)
        check_time_limits(cls.time_limit, cls.soft_time_limit, f" ({where}, with what it inherits)")

    @classmethod
    def is_abstract(cls) -> bool:
        """True for a base class that declares ``abstract = True`` in its own body."""
        return bool(cls.__dict__.get("abstract", False))

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task's body; override it (``@app.task`` does this for you)."""
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here, in this process, as a function.

        Its ``self.request`` is Celery's empty one (``called_directly`` is True), inside
        another task's run too, in its class's own ``__call__`` as well (each task has its
        own request: :func:`~nbtask.core.context.request_of`). A class that overrides it
        (to open a session around every run, as Celery's guide does) has its ``__call__``
        called by every run too, on a worker and in ``apply()``, as Celery's: there
        ``super().__call__`` keeps the run's request.
        """
        if run_entering(self):  # a run's call, through the class's own __call__
            with entering_run(None):  # the task called as a function inside: a direct call
                return self.run(*args, **kwargs)
        with own_request(self, directly_called(self.name, args, kwargs)):
            return self.run(*args, **kwargs)

    def call_from_run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run the task's code for a run (a worker's, ``apply()``'s) whose request is current.

        Through the class's own ``__call__`` if it overrides Task's, as Celery's worker
        calls it; else ``run`` alone (one call less on every task's path).
        """
        if type(self).__call__ is Task.__call__:
            return self.run(*args, **kwargs)
        with entering_run(self):
            return self(*args, **kwargs)

    # Calling -------------------------------------------------------------------------------
    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle:
        """Send the task with these arguments; shortcut for :meth:`apply_async`.

        Parameters
        ----------
        *args, **kwargs
            The task's arguments (checked against its signature unless ``typing=False``).
        """
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | float | None = None,
        expires: dt.datetime | float | None = None,
        task_id: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        link: Signature | Sequence[Signature] | None = None,
        link_error: Signature | Sequence[Signature] | None = None,
        requires: Sequence[str] | None = None,
        on_event: Callable[[Event], None] | None = None,
        label: str | None = None,
        **celery_only: Any,
    ) -> TaskHandle:
        """Send the task to a worker and return its handle at once.

        Parameters
        ----------
        args, kwargs
            Arguments for ``run``; anything cloudpickle can serialise.
        queue
            Queue to send to. Without it: the task's own ``queue``, else the holders of
            the dataset it requires, else the queue the app's ``routes`` give its name,
            else the worker process holding a kept value passed to it (the largest
            among the arguments), else the app's default queue.
        countdown
            Run no earlier than this many seconds from now.
        eta
            Run no earlier than this time (an aware ``datetime`` or epoch seconds).
        expires
            Drop the task unstarted after this time (seconds from now, or a ``datetime``).
        task_id
            Use this id instead of a random one.
        time_limit, soft_time_limit
            Override the task's limits for this call, seconds.
        link, link_error
            Signatures to send with the result when the task succeeds, or with the task
            id when it fails.
        requires
            Named datasets this call needs, instead of the task's own ``requires``.
        on_event
            Called with each of the task's events (``STARTED``, progress, output, the
            final state), attached before the message is sent so none is missed; see
            :meth:`TaskHandle.on_event` for what it gets and on which thread.
        label
            How this call is named on screen (``handle.label``); kept in the task's record,
            so ``app.handle(id)`` in another process, e.g. a restarted kernel, has it too.
        celery_only
            Options of Celery's ``apply_async`` without a per-call counterpart here
            (``priority``, ``serializer``, ``routing_key``, ``retry``...): refused with
            what to do instead, nothing sent.
        """
        refuse_celery_options(celery_only)
        options = self.send_options(
            queue=queue,
            countdown=countdown,
            eta=eta,
            expires=expires,
            task_id=task_id,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            link=link,
            link_error=link_error,
            requires=requires,
            label=label,
        )
        call_args, call_kwargs = call_arguments(args, kwargs)
        self.check_arguments(call_args, call_kwargs, requires)
        call = (self, call_args, call_kwargs, options)
        return self.sender().send_batch([call], on_event=on_event)[0]

    def check_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], requires: Sequence[str] | None = None
    ) -> None:
        """Raise ``TypeError`` (nothing sent) unless ``run`` accepts these arguments.

        The datasets the call requires count as given: the worker passes them. A task with
        ``typing=False``, or whose ``run`` has no readable signature, is not checked.
        """
        needs = dataset_names(requires) if requires is not None else self.requires
        given = [name for name in needs if name in kwargs]
        if given:  # the worker's own copy would silently replace the caller's
            raise TypeError(
                f"{self.name}: {given[0]}= is the dataset it requires, which its workers "
                "pass; do not pass it yourself; nothing was sent"
            )
        cls = type(self)
        # A run not written here (a task sent by name): the worker's class has its signature.
        signature = run_signature(cls) if self.typing and cls.run is not Task.run else None
        if signature is None:
            return
        try:
            check_fits(
                cls, signature, args, {**dict.fromkeys(needs), **kwargs} if needs else kwargs
            )
        except TypeError as exc:
            plain = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
            form = signature.replace(parameters=plain, return_annotation=signature.empty)
            named = [n for n in needs if repr(n) in str(exc)]
            why = f" ({named[0]} is a dataset it requires: its workers pass it)" if named else ""
            raise TypeError(f"{self.name}{form}: {exc}{why}; nothing was sent") from None

    def send_options(
        self,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | float | None = None,
        expires: dt.datetime | float | None = None,
        task_id: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        link: Signature | Sequence[Signature] | None = None,
        link_error: Signature | Sequence[Signature] | None = None,
        requires: Sequence[str] | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Check :meth:`apply_async` options and turn them into message options."""
        if countdown is not None and eta is not None:
            raise ConfigurationError("pass either countdown or eta, not both")
        if task_id is not None:
            check_task_id(task_id)
        if queue:  # "" or None: the usual queue
            queue_name(queue, "queue")
        countdown = seconds("countdown", countdown)
        due = (
            time_at("countdown", countdown, time.time())
            if countdown is not None
            else epoch(eta, absolute=True)
        )
        needs = dataset_names(requires) if requires is not None else self.requires
        usual = self.usual_queue(requires)  # (the task's own requires are checked already)
        options: dict[str, Any] = {
            "queue": queue or usual,
            "eta": due,
            "expires": epoch(expires if expires is not None else self.expires, absolute=False),
            "task_id": task_id,
        }
        if queue is not None and is_holder_queue(queue):
            # One process's own queue: where the task goes if that process is gone.
            options["fallback_queue"] = usual
        for name, value in (("time_limit", time_limit), ("soft_time_limit", soft_time_limit)):
            if value is not None:
                options[name] = positive(name, value)
        if time_limit is not None or soft_time_limit is not None:
            check_time_limits(
                options.get("time_limit", self.time_limit),
                options.get("soft_time_limit", self.soft_time_limit),
                " (this call's limits over the task's)",
            )
        if link is not None or link_error is not None:
            callbacks = link_callbacks(link, link_error)
            if callbacks:
                options["callbacks"] = callbacks
        if requires is not None:
            options["requires"] = needs
        if label:
            options["label"] = str(label)
        return options

    def usual_queue(self, requires: Sequence[str] | None = None) -> str | None:
        """The queue a call that names none goes to, if any chooses one.

        The task's own queue, else the holders of the first dataset it requires (its
        own ``requires``, or ``requires`` given), else the one the app's routes give its
        name. ``None``: the process holding a kept value among the arguments, else the
        app's default queue.
        """
        needs = dataset_names(requires) if requires is not None else self.requires
        holders = data_queue(needs[0]) if needs else None
        return self.queue or holders or self._routed_queue()

    def _routed_queue(self) -> str | None:
        # Routes are the task's app's: on a worker, a task imported by module still has
        # them; one shipped by value has no app (its chains were routed by the client).
        return self.app.route(self.name) if self.app is not None else None

    def delay_many(self, arg_tuples: Iterable[Sequence[Any]]) -> list[TaskHandle]:
        """Send one task per argument tuple, in a single round trip to the broker.

        Parameters
        ----------
        arg_tuples
            The positional arguments of each task, e.g. ``[(1, 2), (3, 4)]``: one handle
            per tuple is returned, in order.
        """
        options = self.send_options()
        calls: list[Call] = [
            (self, positional_args(a, f"delay_many()'s item {i}"), {}, options)
            for i, a in enumerate(arg_tuples)
        ]
        for _, args, _, _ in calls:
            self.check_arguments(args, {})
        return self.sender().send_batch(calls)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this task with (some of) its arguments, to send later.

        Parameters
        ----------
        *args, **kwargs
            Arguments given now; in a chain the previous task's result comes first.
        """
        return Signature(self, args, kwargs)

    def signature(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """Celery's long form of :meth:`s`: ``add.signature((2, 2), countdown=10)``.

        Parameters
        ----------
        args, kwargs
            Arguments given now, as a sequence and a mapping.
        **options
            ``apply_async`` options for when the signature is sent (``immutable=True``
            makes it an :meth:`si` one).
        """
        return Signature(self, tuple(args or ()), dict(kwargs or {})).set(**options)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: in a chain it ignores the previous task's result.

        Parameters
        ----------
        *args, **kwargs
            All the task's arguments.
        """
        return Signature(self, args, kwargs, immutable=True)

    def sender(self) -> Sender:
        """What sends this task now: its app, or the worker running the current task.

        Inside a running task on a worker, tasks shipped by value have no app: they are
        sent through the worker, to the same client.
        """
        running = current_sender()
        if running is not None:
            return running
        if self.app is None:
            raise ConfigurationError(
                f"task {self.name!r} is not bound to an App; create it with @app.task"
            )
        return self.app

    # Pickling --------------------------------------------------------------------------------
    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # A task of an importable module is pickled by name, as Celery's are: a chain's
        # later step, a link, run on the instance the worker's own import holds (the one
        # delay() runs), with that module's state. Others by value, their app left out.
        reference = reduced_by_name(self, Task)
        if reference is not None:
            return reference
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> dict[str, Any]:
        # The app holds connections and threads: a shipped task travels without it.
        state = dict(self.__dict__)
        state.pop("app", None)
        return state

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"
