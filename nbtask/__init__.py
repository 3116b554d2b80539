"""nbtask: send notebook cells and functions to worker processes and watch them live.

``import nbtask`` imports neither IPython, ipywidgets nor kombu; the notebook pieces load
when ``%load_ext nbtask`` runs.
"""

from __future__ import annotations

from nbtask._version import __version__
from nbtask.app import App
from nbtask.errors import (
    BrokerUnavailable,
    ConfigurationError,
    NbtaskError,
    NotRegistered,
    RemoteError,
    SerializationError,
    SignatureError,
    TaskNotFound,
    TaskRevoked,
    TimeLimitExceeded,
    TooLarge,
    WorkerLost,
)
from nbtask.events import Progress, State
from nbtask.handle import TaskHandle
from nbtask.settings import Settings
from nbtask.task import Signature, Task, current_request, progress, track

__all__ = [
    # The API
    "App",
    # Errors
    "BrokerUnavailable",
    "ConfigurationError",
    "NbtaskError",
    "NotRegistered",
    "Progress",
    "RemoteError",
    "SerializationError",
    "Settings",
    "Signature",
    "SignatureError",
    "State",
    "Task",
    "TaskHandle",
    "TaskNotFound",
    "TaskRevoked",
    "TimeLimitExceeded",
    "TooLarge",
    "WorkerLost",
    "__version__",
    "current_request",
    "progress",
    "track",
]
