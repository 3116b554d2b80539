"""The :class:`App`: task registry, sending of tasks, and following them.

Its connection to the broker (made on first use) is
:class:`~nbtask.client.connection.AppConnection`, which it inherits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar, overload

from nbtask.client.celery_app import NO_CONF, Control
from nbtask.client.reattach import reattach, settle_ended
from nbtask.client.revoking import Revoking
from nbtask.client.routes import Routes
from nbtask.client.unsent import expected_handle, give_back, restore_refused, reused_ids
from nbtask.core.canvas import Call, Signature
from nbtask.core.celery_canvas import NO_GROUP_RECORD
from nbtask.core.celery_result import not_in_nbtask
from nbtask.core.datasets import Loader, check_loader, dataset_names
from nbtask.core.declare import task_class
from nbtask.core.handle import FetchWatch, StartedBy, TaskHandle
from nbtask.core.options import validate_options
from nbtask.core.task import Task as BaseTask
from nbtask.errors import ConfigurationError
from nbtask.settings import Settings
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event
from nbtask.wire.records import WorkerInfo

__all__ = ["App"]

F = TypeVar("F", bound=Callable[..., Any])
#: How long finding why a task waits may wait for the registry (an answer in ms, normally).
_REASON_SECONDS = 1.0


class App(Revoking):
    """A task application: define tasks on it, send them, and follow their handles.

    Nothing connects until the first task is sent (or :meth:`connect` is called). With no
    broker configured (no ``broker=`` and no ``NBTASK_BROKER``) the first connection
    starts the embedded local cluster: a private Redis and worker processes that stop
    with this process.

    Parameters
    ----------
    name
        A label for this app, shown in logs.
    broker
        Broker URL; overrides ``NBTASK_BROKER``.
    secret
        Signing secret; overrides ``NBTASK_SECRET``. Required with a broker URL.
    insecure
        Run without a secret on a broker URL (warns; see the README's security model).
    routes
        ``{task name or pattern: queue}``, Celery's ``task_routes``: see :attr:`routes`.
    settings
        Start from these settings instead of ``Settings.from_env()``.
    **overrides
        Any other :class:`~nbtask.settings.Settings` field.

    Examples
    --------
    >>> app = App("demo")
    >>> @app.task
    ... def add(x, y):
    ...     return x + y
    >>> add.delay(2, 3).get(timeout=10)
    5
    """

    Task: type[BaseTask]

    def __init__(
        self,
        name: str = "nbtask",
        *,
        broker: str | None = None,
        secret: str | None = None,
        insecure: bool | None = None,
        routes: Mapping[str, Any] | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if broker is not None:
            overrides["broker_url"] = broker
        if secret is not None:
            overrides["secret"] = secret
        if insecure is not None:
            overrides["insecure"] = insecure
        base = settings if settings is not None else Settings.from_env()
        settings = base.replace(**overrides)  # unknown names refused, with a guess
        if settings.broker_url is not None and not (settings.secret or settings.insecure):
            Signer(None)  # raises the one clear "no secret is set" error
        self._routes = Routes(routes)
        self.tasks: dict[str, BaseTask] = {}
        # Named %%task cells, registered by the notebook layer as reusable tasks.
        self.cells: dict[str, BaseTask] = {}
        #: Named datasets this app declares (``@app.dataset``), for workers importing it.
        self.datasets: dict[str, Loader] = {}
        self.Task = type("Task", (BaseTask,), {"abstract": True, "__module__": __name__})
        #: Shows the progress of a large result's fetch in ``get()`` (set by the notebook).
        self.fetch_watch: FetchWatch | None = None
        #: What :meth:`handle` gives for a task, given its handle (set by the notebook:
        #: a cell's handle, whose result is the cell's values); ``None``: the handle.
        self.reattached: Callable[[TaskHandle], TaskHandle] | None = None
        # Last: it registers the app to be closed at exit, once all of it is made.
        super().__init__(name, settings)

    # Routing ---------------------------------------------------------------------------------
    @property
    def routes(self) -> dict[str, str]:
        """The queue of a task when neither its call nor its task names one (settable).

        ``{task name or pattern: queue}``, Celery's ``task_routes`` in dict form: patterns
        are ``fnmatch`` globs (``"etl.*"``); a key that is the task's name wins, then the
        first pattern that matches, in order; a value may be ``{"queue": name}``. A
        ``%%task`` cell is routed by its name, an unnamed one as ``nbtask.cell``.

        Raises
        ------
        ConfigurationError
            On setting: a key or value of another shape (naming the key).
        """
        return dict(self._routes.table)

    @routes.setter
    def routes(self, routes: Mapping[str, Any] | None) -> None:
        self._routes = Routes(routes)

    def route(self, name: str) -> str | None:
        """The queue :attr:`routes` give task ``name``, or ``None`` when no key matches."""
        return self._routes.queue_for(name)

    # Defining tasks --------------------------------------------------------------------------
    @overload
    def task(self, fn: F, /) -> BaseTask: ...
    @overload
    def task(self, name: str | None = None, /, **options: Any) -> Callable[[F], BaseTask]: ...

    def task(self, fn: Any = None, /, **options: Any) -> Any:
        """Turn a function into a task; use bare (``@app.task``) or with options.

        The options are Celery's, with Celery's meanings (any other is refused here); the
        README's table "Tasks: Celery's names, Celery's meanings" says what each does.

        Parameters
        ----------
        name : str, optional
            Registered name; default ``module.qualname``. May be given positionally.
        bind, base, queue, acks_late, reject_on_worker_lost, ignore_result, backend, expires
            ``self`` first; a subclass of ``app.Task``; the default queue; acknowledge after
            the run (redelivered if the worker dies; ``reject_on_worker_lost=False`` fails
            it instead); keep no result (``backend=None`` only); seconds until it is dropped.
        max_retries, default_retry_delay, retry_backoff, retry_backoff_max, retry_jitter
            How many retries, and the delay before each (fixed, or growing to a cap).
        autoretry_for, dont_autoretry_for, retry_kwargs, throws
            Exceptions retried automatically, those never retried, what each automatic
            retry passes to ``self.retry()``; expected ones, logged in one line.
        rate_limit, time_limit, soft_time_limit
            Starts per worker (``"10/s"``); seconds to the kill, or to ``SoftTimeLimitExceeded``.
        serializer, requires, typing
            ``"cloudpickle"`` or ``"json"``; datasets to run beside (passed by name); check
            calls against the signature when sent (default ``True``).
        track_started, store_errors_even_if_ignored, priority, compression
            The first two accepted and change nothing; the last two refused, with advice.
        """
        if isinstance(fn, str):
            options["name"] = fn
            fn = None
        options = validate_options(options)

        def decorate(func: Callable[..., Any]) -> BaseTask:
            return self._make_task(func, options)

        return decorate(fn) if fn is not None else decorate

    def _make_task(self, func: Callable[..., Any], options: Mapping[str, Any]) -> BaseTask:
        return self.register_task(task_class(func, options, self.Task)())

    def dataset(self, name: str) -> Callable[[Loader], Loader]:
        """Declare a named dataset, made by the decorated function on the workers that hold it.

        A worker holds it when it imports this app (``nbtask worker -A module``); it loads
        it the first time a task in a process needs it and keeps it for that process's life.
        Tasks with ``requires=(name,)`` (cells: ``%%task --requires name``) go only to such
        workers and receive it as the keyword argument (variable) ``name``.

        Parameters
        ----------
        name
            The dataset's name: a Python identifier.
        """
        if callable(name):  # @app.dataset without its name
            named = getattr(name, "__name__", "NAME")
            raise ConfigurationError(f"@app.dataset takes the name first: @app.dataset({named!r})")
        (checked,) = dataset_names(name, "dataset")

        def register(loader: Loader) -> Loader:
            what = f"@app.dataset({checked!r}) on {loader!r}"
            self.datasets[checked] = check_loader(loader, what)
            return loader

        return register

    def register_task(self, task: BaseTask) -> BaseTask:
        """Register a task instance (a class-based task with ``run``) under its name.

        A class with no name given gets ``module.qualname``, its own: a subclass of a
        registered class is a task of its own too. A name given in a class body is
        inherited, as Celery's are: a subclass registered beside it names itself.

        Raises
        ------
        ConfigurationError
            The class is abstract, or another task's code holds its name.
        """
        cls = type(task)
        if cls.is_abstract():
            raise ConfigurationError(f"{cls.__name__} is abstract and cannot be registered")
        if not _given_name(cls):
            type.__setattr__(cls, "name", f"{cls.__module__}.{cls.__qualname__}")
        existing = self.tasks.get(task.name)
        # Re-running a notebook cell redefines a task: that replaces it. Two different
        # functions under one name would silently run the wrong code: refuse.
        if existing is not None and _origin(existing) != _origin(task):
            raise ConfigurationError(
                f"task name {task.name!r} is already used by {_origin(existing)}; "
                f"give {_origin(task)} another name=..."
            )
        task.app = self
        self.tasks[task.name] = task
        return task

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Sending ---------------------------------------------------------------------------------
    def send(
        self,
        task: BaseTask,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> TaskHandle:
        """Send one task with message ``options`` (see :meth:`Task.send_options`)."""
        return self.send_batch([(task, args, kwargs, options)])[0]

    def send_batch(
        self, calls: Sequence[Call], *, on_event: Callable[[Event], None] | None = None
    ) -> list[TaskHandle]:
        """Send ``(task, args, kwargs, options)`` calls in one round trip.

        ``on_event`` is attached to every handle before anything is sent (see
        :meth:`TaskHandle.on_event`).

        Raises
        ------
        ConfigurationError
            A call reused the id of another task (``task_id=``), queued, running or
            ended; the other calls were sent.
        """
        builder, channel = self._message_builder(), self._channel
        built = [builder.build(call, channel) for call in calls]
        live = self._live_workers()
        live.check_secret({message.queue for message, _ in built})
        listener = self._listen()
        handles = [
            expected_handle(listener, m.id, m.name, m.queue, m.label or "", m.created)
            or TaskHandle(self, m.id, m.name, m.queue, m.label or "", sent=m.created)
            for m, _ in built
        ]
        for handle, (message, _) in zip(handles, built, strict=True):
            handle.fallback_queue = message.fallback_queue or ""
        # A refused call must leave the handle of the task holding its id in place.
        previous = []
        for handle in handles:
            if on_event is not None:
                handle.on_event(on_event)
            previous.append(listener.register(handle))
        # A lone call (delay()) does not wait for the broker's answer; a batch waits once
        # for all, and so does a call with its own task_id (it may be refused as reused).
        wait = len(calls) != 1 or bool(calls[0][3].get("task_id"))
        try:
            try:
                refused = self.transport.publish([p for _, p in built], wait=wait)
            finally:
                self._revoke_unsent()
        except BaseException:
            # The caller gets no handle (broker away, Ctrl-C): none stays registered,
            # kept forever by the listener for a task nobody can follow.
            give_back(listener, handles, previous)
            raise
        if not any(refused):
            live.note_sent(handles)
            return handles
        taken = restore_refused(listener, handles, refused, previous)
        live.note_sent([h for h, state in zip(handles, refused, strict=True) if not state])
        raise ConfigurationError(reused_ids(taken))

    def waiting_reason(self, queue: str, started_by: StartedBy | None = None) -> str | None:
        """Why a task on ``queue`` waits, if known: see :attr:`TaskHandle.waiting_reason`."""
        live, transport = self._live, self._transport
        if live is None or transport is None:
            return None
        # What is told besides a task's state: a store that does not answer (read after a
        # get() timed out, say) must not make the caller wait one more timeout for it.
        with transport.answers_within(_REASON_SECONDS):
            return live.waiting_reason(queue, started_by)

    def moved_to(self, task_id: str, queue: str) -> str | None:
        """The queue a task left a gone process's own ``queue`` for (:attr:`TaskHandle.queue`)."""
        live, transport = self._live, self._transport
        if live is None or transport is None:
            return None
        with transport.answers_within(_REASON_SECONDS):
            return live.moved_to(task_id, queue)

    def expect(self, task_id: str, name: str, sent: float | None = None) -> TaskHandle:
        """A handle for a task that a worker will send (a later step of a chain).

        ``sent``: the send its events name (a chain stamps it); ``None`` takes any send
        of this app's task with that id. Without ``sent``, a task that already ended (a
        ``link`` that ran before this call) ends the handle at once, with the outcome its
        record keeps.
        """
        handle = TaskHandle(self, task_id, name, sent=sent)
        listener = self._listen()
        listener.register(handle)
        if sent is not None:  # a send the caller stamps is expected before it is made
            return handle
        # Registered first: an end sent from now on reaches the handle; one sent before
        # reached no handle, and the record has it.
        prefix = self.settings.key_prefix
        settle_ended(handle, store=self.store, signer=self.signer, prefix=prefix)
        if handle.done() and listener.get(task_id) is handle:
            listener.forget(task_id)
        return handle

    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        acks_late: bool = False,
        **options: Any,
    ) -> TaskHandle:
        """Send a task by name, for tasks that only the workers define (Celery's ``send_task``).

        Parameters
        ----------
        name
            The task's registered name on the workers.
        args, kwargs
            Its arguments.
        acks_late
            For a task this app does not define: acknowledge after it runs, so that a
            crashed worker's task is redelivered (a task defined here keeps its own).
        **options
            Those of :meth:`Task.apply_async` (``queue``, ``countdown``, ``eta``...).
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"send_task needs a task's name, got {name!r}")
        return self._named(name, acks_late).apply_async(args, kwargs, **options)

    def _named(self, name: str, acks_late: bool = False) -> BaseTask:
        """The task of that name: this app's own, else one only the workers define."""
        task = self.tasks.get(name)
        if task is None:
            attrs = {"name": name, "abstract": False, "acks_late": acks_late, "__module__": ""}
            task = type("RemoteTask", (self.Task,), attrs)()
            task.app = self
        return task

    def signature(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """Celery's ``app.signature(name, args, kwargs, **options)``: a task's signature by name.

        The name may be one of this app's tasks or one only the workers define (as for
        :meth:`send_task`); ``options`` as for :meth:`Task.signature`.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"signature() needs a task's name, got {name!r}")
        return self._named(name).signature(args, kwargs, **options)

    # Following tasks -------------------------------------------------------------------------
    def handle(self, task_id: str) -> TaskHandle:
        """Re-attach to a task by id, from this or any other process.

        Events the task already sent are replayed (output included) while they are
        still kept; a finished task's result comes from the result store.

        Parameters
        ----------
        task_id
            The task's id, or a unique prefix of it of 8 characters or more (what
            ``%tasks`` and other views show).

        Raises
        ------
        TaskNotFound
            No record of the task (a wrong id, or one older than ``result_ttl``), or
            several tasks whose ids begin with ``task_id``.
        """
        task_id = self._task_id(task_id)
        listener = self._listen()
        handle = listener.get(task_id)
        if handle is None:
            handle = reattach(
                task_id,
                owner=self,
                store=self.store,
                signer=self.signer,
                listener=listener,
                result_ttl=self.settings.result_ttl,
                prefix=self.settings.key_prefix,
            )
        return handle if self.reattached is None else self.reattached(handle)

    def AsyncResult(self, task_id: str) -> TaskHandle:  # Celery's spelling
        """Celery's name for :meth:`handle`.

        Unlike Celery's, an id the store has no record of raises ``TaskNotFound`` rather
        than reading ``PENDING`` forever.

        Parameters
        ----------
        task_id
            The task's id, or a unique prefix of it (as for :meth:`handle`).
        """
        return self.handle(task_id)

    @property
    def control(self) -> Control:
        """Celery's ``app.control``: ``app.control.revoke(id, terminate=...)`` is :meth:`revoke`."""
        return Control(self)

    @property
    def GroupResult(self) -> NoReturn:  # Celery's name, capitalised as a class
        """Not in nbtask: a group is gathered again from its tasks' ids (``GroupHandle``)."""
        raise not_in_nbtask("app.GroupResult", NO_GROUP_RECORD)

    @property
    def conf(self) -> NoReturn:
        """Not in nbtask: settings are ``App(...)`` keywords or ``NBTASK_*`` variables."""
        raise AttributeError(NO_CONF)

    def workers(self, *, recent: bool = False) -> dict[str, WorkerInfo]:
        """Live workers, ``{worker_id: info}``.

        Parameters
        ----------
        recent
            ``False`` reads the registry now; ``True`` takes what this app read in the
            last few seconds, as sending does, and reads it now only if it read none.
        """
        live = self._live_workers()
        return live.recent() if recent else live.read()

    def sent_to(self, queue: str) -> bool:
        """Whether work this app sent to ``queue``, one worker process's own, has not ended."""
        return self._live_workers().sent_to(queue)

    def __repr__(self) -> str:
        where = self.settings.broker_url or "embedded"
        return f"<App {self.name!r} broker={where} tasks={len(self.tasks)}>"


def _given_name(cls: type[BaseTask]) -> bool:
    """Whether ``cls`` has a name that was given to it or to the class it inherits it from.

    Not one made from the module and qualname of the class that holds it (registering a
    class without a name writes one there): that name is that class's alone.
    """
    holder = next(klass for klass in cls.__mro__ if "name" in klass.__dict__)
    made = f"{holder.__module__}.{holder.__qualname__}"
    return bool(cls.name) and (holder is cls or cls.name != made)


def _origin(task: BaseTask) -> str:
    code = type(task).__dict__.get("__wrapped__", type(task))
    return f"{code.__module__}.{code.__qualname__}"
