"""Every exception and warning nbtask raises, under one base class :class:`NbtaskError`."""

from __future__ import annotations

import concurrent.futures
import linecache
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BlobError",
    "BlobGone",
    "BrokerUnavailable",
    "CellError",
    "CellNameError",
    "CodeDiffersWarning",
    "ConfigurationError",
    "DecodeError",
    "Ignore",
    "MaxRetriesExceededError",
    "NbtaskError",
    "NotRegistered",
    "NotebookFailed",
    "NotebookInterrupted",
    "Reject",
    "RemoteError",
    "ResultNotReady",
    "Retry",
    "SendUnconfirmed",
    "SerializationError",
    "SignatureError",
    "SoftTimeLimitExceeded",
    "TaskNotFound",
    "TaskPredicate",
    "TaskRevoked",
    "TimeLimitExceeded",
    "TooLarge",
    "WorkerLost",
]


class NbtaskError(Exception):
    """Base class of every error nbtask raises."""


class ConfigurationError(NbtaskError, ValueError):
    """A setting, option or URL is wrong; the message says which and how to fix it."""


class BrokerUnavailable(NbtaskError, ConnectionError):
    """The broker cannot be reached."""


class SendUnconfirmed(BrokerUnavailable):
    """The broker was sent tasks' messages but never said whether it queued them: they may run.

    ``task_ids`` names those tasks. Their handles stay live: once the broker answers
    again, a task that was queued runs and its handle gets its result.
    """

    def __init__(self, message: str = "", task_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.task_ids = task_ids

    def __reduce__(self) -> tuple[type[SendUnconfirmed], tuple[str, tuple[str, ...]]]:
        return (type(self), (str(self), self.task_ids))


class SignatureError(NbtaskError):
    """A message or result failed verification: unsigned, forged, tampered or truncated."""


class DecodeError(NbtaskError, ValueError):
    """A verified message is malformed: a missing field, a wrong type, an unknown kind."""


class SerializationError(NbtaskError, TypeError):
    """A value cannot be serialised (pickled) or deserialised; the message names it."""


class BlobError(NbtaskError):
    """A value kept out of band cannot be loaded: its blob expired, is missing, or was altered."""


class BlobGone(BlobError):
    """A value's blob is no longer in the store: it expired, was deleted, or was never written.

    Parameters
    ----------
    reason
        What is gone and why it may be.
    remedy
        What makes the value again; whoever knows better (a notebook knows the cell that
        made a kept value) raises it again with its own.
    """

    def __init__(self, reason: str, remedy: str = "run the task again") -> None:
        super().__init__(f"{reason}; {remedy}")
        self.reason = reason
        self.remedy = remedy

    def __reduce__(self) -> tuple[type[BlobGone], tuple[str, str]]:
        # Sent back from a worker as a task's error: rebuilt from its parts, not its text.
        return (type(self), (self.reason, self.remedy))


class ResultNotReady(NbtaskError, RuntimeError):
    """A task's handle was passed as an argument, but that task has not succeeded."""


class TooLarge(NbtaskError, ValueError):
    """A message is larger than the configured ``max_message_bytes``."""


class NotRegistered(NbtaskError, KeyError):
    """A worker received a task name it does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not registered"


class AppClosed(NbtaskError, RuntimeError):
    """A task's handle was asked for its result after its app was closed (the task runs on)."""


class TaskNotFound(NbtaskError, LookupError):
    """No task with this id is known to the result store (never sent, expired, or lost).

    Lost: a broker that restarted without persistence lost the queued task with its
    record; its handle raises this once the client reads from the broker again.
    """


class TaskRevoked(NbtaskError, concurrent.futures.CancelledError):
    """The task was revoked or cancelled before it finished.

    A ``concurrent.futures.CancelledError`` too: what a cancelled ``Future`` raises.
    """


class SoftTimeLimitExceeded(NbtaskError):
    """Raised inside a task when it passes its soft time limit; it may clean up and return."""


class Retry(NbtaskError):
    """Raised by ``self.retry()``: the task is sent again later; not a failure.

    Parameters
    ----------
    message
        Why the task is retried.
    exc
        The exception that caused the retry, if any.
    when
        Seconds until the retry runs.
    new_args, new_kwargs
        The arguments the retry runs with, if not the task's own (``retry(args=...)``).
    queue
        The queue the retry is sent to, if not the task's own (``retry(queue=...)``).
    """

    def __init__(
        self,
        message: str = "",
        exc: BaseException | None = None,
        when: float = 0.0,
        new_args: tuple[Any, ...] | None = None,
        new_kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
    ):
        super().__init__(message or (f"retry: {exc!r}" if exc else "retry"))
        self.exc = exc
        self.when = when
        self.new_args = new_args
        self.new_kwargs = new_kwargs
        self.queue = queue


class MaxRetriesExceededError(NbtaskError):
    """A task asked for another retry after using all of ``max_retries``."""


class TaskPredicate(NbtaskError):
    """Base of what task code raises to tell its worker how to settle it (Celery's)."""


class Ignore(TaskPredicate):
    """Raised by task code: its worker stores no outcome (Celery's ``Ignore``).

    The message is acknowledged and nothing follows: no result, no handlers, no links;
    the task's record keeps what the task itself set (``STARTED``, or the state it gave
    ``self.update_state``), so its handle's ``get()`` waits until its timeout.
    """


class Reject(TaskPredicate):
    """Raised by task code: its worker rejects the message (Celery's ``Reject``).

    No handler runs (``on_failure``, ``after_return``), nor an automatic retry. With
    ``requeue=False`` the task fails with this exception as its error (Celery 5's
    FAILURE result; its errbacks are sent). With ``requeue=True`` the message goes back
    to its queue to run again, bounded so that a task that always rejects does not loop:
    it comes back after 1 s, then 2, 4, 8... (its record ``PENDING`` meanwhile), and
    once it was put back ``max_redeliveries`` times (a setting, 5 by default) it fails
    as with ``requeue=False``.

    Parameters
    ----------
    reason
        Why; logged by the worker, and the error's text.
    requeue
        Put the message back to run again instead of failing the task.
    """

    def __init__(self, reason: object = None, requeue: bool = False) -> None:
        super().__init__(reason, requeue)
        self.reason = reason
        self.requeue = requeue

    def __str__(self) -> str:
        return str(self.reason) if self.reason is not None else "rejected"

    def __repr__(self) -> str:
        return f"reject requeue={self.requeue}: {self.reason}"


class RemoteError(NbtaskError):
    """An exception raised by task code on a worker.

    Parameters
    ----------
    ename
        The name of the original exception type, e.g. ``"ZeroDivisionError"``.
    evalue
        ``str()`` of the original exception.
    traceback
        The worker-side traceback as text.
    task_id
        The id of the task that failed.
    etype
        The original type's ``module.QualName``, when the worker sent it.
    shown_traceback
        The traceback as a kernel shows it (IPython's coloured lines), when the worker
        sent it (a notebook cell's); IPython shows it instead of ``traceback``.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str = "",
        task_id: str = "",
        etype: str = "",
        *,
        shown_traceback: Sequence[str] = (),
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.task_id = task_id
        self.etype = etype
        self.shown_traceback = list(shown_traceback)

    def __str__(self) -> str:
        # Python prints ``type: str(exc)``: an error that is its own type (WorkerLost)
        # would say its name twice.
        if self.evalue and self.ename == type(self).__name__:
            text = self.evalue
        else:
            text = f"{self.ename}: {self.evalue}" if self.evalue else self.ename
        if self.traceback:
            text += "\n\nRemote " + self.traceback.rstrip()[0].lower() + self.traceback.rstrip()[1:]
        return text

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing the local traceback, so the notebook shows
        # the worker's traceback, which is the one that points at the user's code.
        if self.shown_traceback:  # in colour, as the kernel would have shown it
            return list(self.shown_traceback)
        text = self.traceback.rstrip() if self.traceback else ""
        last = f"{self.ename}: {self.evalue}" if self.evalue else self.ename
        # A worker's traceback says that line already (its type's name, qualified when it
        # is not a built-in), though not always last: the exception's notes follow it, and
        # an exception group's tree. Said once, as Python says it.
        lines = _cells_named(text.splitlines())
        said = _says_exception(lines, last.splitlines()[0])
        return [*lines, *([] if said else [last])]


def _says_exception(lines: list[str], first: str) -> bool:
    """Whether a traceback's ``lines`` have the exception line starting ``first``."""
    for line in lines:
        bare = line.lstrip(" |")  # an exception group's lines are drawn in a margin
        if bare == first or bare.endswith("." + first):
            return True
    return False


_FRAME = re.compile(r'^(?P<indent> *)File "(?P<file>[^"]+)", line (?P<line>\d+)(?P<rest>.*)$')


def _cells_named(lines: list[str]) -> list[str]:
    """A worker's traceback, its frames in the notebook's earlier cells named as IPython does.

    A function defined in an earlier cell runs on the worker under the kernel's own name
    for that cell (``/tmp/ipykernel_…/….py``), whose lines only the kernel has: shown in
    that kernel, such a frame reads ``File "Cell In[2]", line 3``, followed by its line.
    """
    cells = _notebook_cells()
    out: list[str] = []
    for i, line in enumerate(lines):
        frame = _FRAME.match(line)
        number = cells.get(frame["file"]) if frame else None
        if frame is None or number is None:
            out.append(line)
            continue
        indent, lineno = frame["indent"], int(frame["line"])
        out.append(f'{indent}File "Cell In[{number}]", line {lineno}{frame["rest"]}')
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not following.startswith(indent + "  ") or _FRAME.match(following):
            source = linecache.getline(frame["file"], lineno).strip()
            out += [f"{indent}  {source}"] if source else []
    return out


def _notebook_cells() -> Mapping[str, int]:
    """The IPython shell's cell numbers by code file name, if this process runs one."""
    ipython = sys.modules.get("IPython")  # only where IPython is loaded already
    shell = ipython.get_ipython() if ipython is not None else None
    cells = getattr(getattr(shell, "compile", None), "_filename_map", None)
    return cells if isinstance(cells, dict) else {}


class TimeLimitExceeded(RemoteError):
    """The task ran past its hard time limit and its process was killed."""


class WorkerLost(RemoteError):
    """The worker process running the task died before it reported a result."""


class CellError(NbtaskError):
    """The pre-send check refused a ``%%task`` cell; nothing was sent."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the error is about the user's cell,
        # one line as Python shows its own, not nbtask's internal frames.
        return [f"{_user_facing_name(self)}: {self}"]


class CellNameError(CellError, NameError):
    """The cell reads a name defined nowhere: Python's own ``NameError``, found before sending.

    Also raised when a worker lacked a name the notebook defines, which the cell read in a
    way nbtask could not see: it says how to have it sent.
    """


def _user_facing_name(exc: BaseException) -> str:
    """The built-in exception an nbtask error stands for (``NameError``), else its name."""
    for kind in type(exc).__mro__:
        if kind.__module__ == "builtins" and kind not in (Exception, BaseException, object):
            return kind.__name__
    return type(exc).__name__


class NotebookFailed(NbtaskError):
    """``nbtask run`` failed: a cell raised, a cell timed out, or the kernel died.

    A cell tagged ``raises-exception`` may raise.

    Attributes
    ----------
    result : object
        What ran, and where the executed notebook was written
        (:class:`nbtask.notebook.headless.RunResult`).
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class NotebookInterrupted(NotebookFailed):
    """``nbtask run`` was stopped by a signal (Ctrl-C's ``SIGINT``, or ``SIGTERM``).

    The kernel was interrupted, which cancels the task a cell waited for (and the
    background cells are cancelled), then shut down; the notebook as far as it ran has
    been written.

    Attributes
    ----------
    signal_number : int
        The signal that stopped it: a command exits with ``128 + signal_number``.
    """

    def __init__(self, message: str, result: object, signal_number: int) -> None:
        super().__init__(message, result)
        self.signal_number = signal_number


class CodeDiffersWarning(NbtaskError, UserWarning):
    """A worker ran its own copy of a task sent by name, which differs from this process's.

    Its module was edited (or reloaded) since the worker imported it, and the result is
    the worker's code's. Restart the workers to run the edit; filter this warning
    (``warnings.simplefilter("ignore", CodeDiffersWarning)``) where the difference is meant.
    Under nbtask's one base class, so a warning made an error is caught as one of nbtask's.
    """
