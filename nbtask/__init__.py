"""nbtask: send notebook cells and functions to worker processes and watch them live.

``import nbtask`` imports neither IPython, ipywidgets nor kombu; the notebook pieces load
when ``%load_ext nbtask`` runs.
"""

from __future__ import annotations

from typing import Any

from nbtask._version import __version__
from nbtask.client.app import App
from nbtask.client.celery_names import current_app, shared_task, signature, uuid
from nbtask.client.default import default_app as app
from nbtask.core.canvas import Chain, Group, GroupHandle, Signature, chain, chord, group
from nbtask.core.context import current_request, progress, track
from nbtask.core.current import current_task
from nbtask.core.eager import EagerResult
from nbtask.core.handle import TaskHandle
from nbtask.core.handlers import ExceptionInfo
from nbtask.core.task import Task
from nbtask.errors import (
    AppClosed,
    BrokerUnavailable,
    CodeDiffersWarning,
    ConfigurationError,
    Ignore,
    MaxRetriesExceededError,
    NbtaskError,
    NotRegistered,
    Reject,
    RemoteError,
    Retry,
    SendUnconfirmed,
    SerializationError,
    SignatureError,
    SoftTimeLimitExceeded,
    TaskNotFound,
    TaskRevoked,
    TimeLimitExceeded,
    TooLarge,
    WorkerLost,
)
from nbtask.settings import Settings
from nbtask.wire import states
from nbtask.wire.events import Event, EventType, Progress, State

#: Celery's name for :class:`TaskRevoked` (``celery.exceptions.TaskRevokedError``).
TaskRevokedError = TaskRevoked
#: Celery's ``celery.exceptions.TimeoutError``: what ``get(timeout=...)`` raises when the
#: task has not ended in time; in nbtask, the built-in ``TimeoutError`` itself.
TimeoutError = TimeoutError  # noqa: PLW0127 - re-exported under Celery's import path


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext nbtask``; imports the notebook layer (IPython, ipywidgets) only now."""
    from nbtask.notebook.magics import load_ipython_extension as load  # noqa: PLC0415 - heavy

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext nbtask``: remove the magics' hooks and stop what they started."""
    from nbtask.notebook.magics import unload_ipython_extension as unload  # noqa: PLC0415

    unload(shell)


__all__ = [
    "App",
    "AppClosed",
    "BrokerUnavailable",
    "Chain",
    "CodeDiffersWarning",
    "ConfigurationError",
    "EagerResult",
    "Event",
    "EventType",
    "ExceptionInfo",
    "Group",
    "GroupHandle",
    "Ignore",
    "MaxRetriesExceededError",
    "NbtaskError",
    "NotRegistered",
    "Progress",
    "Reject",
    "RemoteError",
    "Retry",
    "SendUnconfirmed",
    "SerializationError",
    "Settings",
    "Signature",
    "SignatureError",
    "SoftTimeLimitExceeded",
    "State",
    "Task",
    "TaskHandle",
    "TaskNotFound",
    "TaskRevoked",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "TooLarge",
    "WorkerLost",
    "__version__",
    "app",
    "chain",
    "chord",
    "current_app",
    "current_request",
    "current_task",
    "group",
    "load_ipython_extension",
    "progress",
    "shared_task",
    "signature",
    "states",
    "track",
    "unload_ipython_extension",
    "uuid",
]
