"""Celery's module-level names that need an app: ``signature()``, ``shared_task``, ``uuid``.

And ``current_app``. They use the app given, else the process's default app (:func:`nbtask.app`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nbtask.client.app import App
from nbtask.client.default import default_app
from nbtask.core.canvas import Signature
from nbtask.core.context import current_request
from nbtask.core.current import Proxy, running_task
from nbtask.core.options import new_task_id
from nbtask.core.task import Task
from nbtask.errors import ConfigurationError

__all__ = ["current_app", "shared_task", "signature", "uuid"]


def signature(
    varies: str | Signature | Task,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    app: App | None = None,
    **options: Any,
) -> Signature:
    """Celery's ``signature(...)``: a signature from a task's name, a task, or a signature.

    Parameters
    ----------
    varies
        A task's registered name (looked up in ``app``, else the default app
        :func:`nbtask.app`; a name only the workers define is sent by name, as
        :meth:`~nbtask.App.send_task` does), a task, or a signature (copied, with
        ``args``, ``kwargs`` and ``options`` added as :meth:`Signature.clone` adds them).
    args, kwargs
        The task's arguments given now.
    app
        The app whose task a name is.
    **options
        :meth:`~nbtask.Task.apply_async` options (``immutable=True`` makes it ``si``).

    Returns
    -------
    Signature
        What ``task.signature(args, kwargs, **options)`` returns.
    """
    if isinstance(varies, Signature):
        return varies.clone(args, kwargs, **options)
    if isinstance(varies, Task):
        return varies.signature(args, kwargs, **options)
    if isinstance(varies, str):
        return (app or default_app()).signature(varies, args, kwargs, **options)
    raise ConfigurationError(
        f"signature() takes a task's name, a task or a signature, not {varies!r}"
    )


def shared_task(*args: Any, **options: Any) -> Any:
    """Celery's ``@shared_task``: ``@app.task`` on the process's default app.

    The default app is :func:`nbtask.app`: in a notebook, the notebook's own (the one
    ``%nbtask connect`` chose), else one configured from the ``NBTASK_*`` environment
    (``NBTASK_BROKER``...; with none, the embedded cluster). Unlike Celery's, an
    ``App(...)`` made elsewhere does not become the app of shared tasks: decorate with
    that app's ``@app.task`` to send through it. Workers find a shared task as any other,
    by its module (``nbtask worker -A proj.tasks``).

    Parameters
    ----------
    *args, **options
        As for :meth:`nbtask.App.task`: bare (``@shared_task``), a name, or options
        (``@shared_task(bind=True, max_retries=3)``).

    Returns
    -------
    Task or decorator
        The task, used bare; else the decorator that makes it.
    """
    return default_app().task(*args, **options)


def uuid() -> str:
    """Celery's ``uuid()``: a fresh task id, for ``apply_async(task_id=uuid())``.

    nbtask's form of id: 32 hex digits (``uuid.uuid4().hex``), not Celery's dashed one.
    """
    return new_task_id()


def _current_app() -> App:
    """The running task's app, else the process's default app; see :data:`current_app`."""
    task = running_task()
    app = getattr(task, "app", None)
    if isinstance(app, App):
        return app
    request = current_request()
    if task is not None and request is not None and request.in_worker:
        raise ConfigurationError(
            f"current_app: task {getattr(task, 'name', task)!r} was shipped to this worker "
            "without its app (it was defined in a notebook or a script); send other tasks "
            "from it with other.delay(...), which goes through this worker, or define the "
            "task in a module the worker imports (nbtask worker -A proj.tasks)"
        )
    return default_app()


#: Celery's ``celery.current_app``: in a running task, the app the task is registered on
#: (on a worker, that of the module the worker imported it from); elsewhere the process's
#: default app, :func:`nbtask.app`. A proxy, found each time it is used.
current_app: Any = Proxy(_current_app, "current_app")
