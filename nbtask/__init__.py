"""nbtask: send notebook cells and functions to worker processes and watch them live.

``import nbtask`` imports neither IPython, ipywidgets nor kombu; the notebook pieces load
when ``%load_ext nbtask`` runs.
"""

from __future__ import annotations

from typing import Any

from nbtask._version import __version__
from nbtask.app import App
from nbtask.canvas import Chain, Group, GroupHandle, Signature, chain, group
from nbtask.errors import (
    BrokerUnavailable,
    ConfigurationError,
    MaxRetriesExceededError,
    NbtaskError,
    NotRegistered,
    RemoteError,
    Retry,
    SerializationError,
    SignatureError,
    SoftTimeLimitExceeded,
    TaskNotFound,
    TaskRevoked,
    TimeLimitExceeded,
    TooLarge,
    WorkerLost,
)
from nbtask.events import Progress, State
from nbtask.handle import TaskHandle
from nbtask.settings import Settings
from nbtask.task import ExceptionInfo, Task, current_request, progress, track


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext nbtask``; imports the notebook layer (IPython, ipywidgets) only now."""
    from nbtask.magics import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext nbtask``: remove the magics' hooks and stop what they started."""
    from nbtask.magics import unload_ipython_extension as unload

    unload(shell)


__all__ = [
    "App",
    "BrokerUnavailable",
    "Chain",
    "ConfigurationError",
    "ExceptionInfo",
    "Group",
    "GroupHandle",
    "MaxRetriesExceededError",
    "NbtaskError",
    "NotRegistered",
    "Progress",
    "RemoteError",
    "Retry",
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
    "TimeLimitExceeded",
    "TooLarge",
    "WorkerLost",
    "__version__",
    "chain",
    "current_request",
    "group",
    "load_ipython_extension",
    "progress",
    "track",
    "unload_ipython_extension",
]
