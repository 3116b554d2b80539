"""Celery's module-level names that need an app: ``signature()`` and ``shared_task``.

Both use the app given, else the process's default app (:func:`nbtask.app`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nbtask.client.app import App
from nbtask.client.default import default_app
from nbtask.core.canvas import Signature
from nbtask.core.task import Task
from nbtask.errors import ConfigurationError

__all__ = ["signature"]


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
