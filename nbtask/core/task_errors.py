"""The exceptions a task's final event stands for, as its handle raises them."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from nbtask.errors import (
    BlobError,
    RemoteError,
    SerializationError,
    TaskRevoked,
    TimeLimitExceeded,
    WorkerLost,
)

__all__ = [
    "not_kept",
    "revoked",
    "task_exception",
    "unloadable",
    "unloadable_value",
    "unloadable_values",
    "worker_lost",
]

# Failures nbtask itself reports come back as its own exception types.
_KNOWN_FAILURES: dict[str, type[RemoteError]] = {
    "TimeLimitExceeded": TimeLimitExceeded,
    "WorkerLost": WorkerLost,
}


#: What to do about a value that cannot be loaded because a module or class it names is
#: missing here, and what failed when nothing it names is missing.
_INSTALL = "install what defines it here"
_REBUILD_FAILED = (
    "what it names is found here, and rebuilding the value from its state failed (its class "
    "here does not take the state it had on the worker, or raised while loading it)"
)


# How pickle says a module has no such name: the name, and the module (3.11-3.14).
_NOT_IN_MODULE = re.compile(r"Can't (?:get attribute|resolve path) '([^']+)' on <module '([^']+)'")


def _if_missing(why: str) -> str:
    """What to do about a value naming something missing here, as ``why`` says.

    Nothing to install when it is the notebook's own (``__main__``: the notebook or a
    cell): only the process that defined it can find it by its name.
    """
    found = _NOT_IN_MODULE.search(why)
    if found is None or not _is_main(found[2]):
        return _INSTALL
    return (
        f"{found[1]!r} is defined in the notebook or a cell (module __main__) and could not "
        "be pickled by value (its kind, or its own __reduce__, names it), so it was pickled "
        "by name, which only the process that defined it can find: define it in a .py "
        "module next to the notebook and import it, or make it where it is used"
    )


def _is_main(module: str) -> bool:
    """Whether pickle names this process's ``__main__`` as ``module``.

    A module's repr gives its spec's name: ``python -m tool`` runs ``tool.__main__``.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return module == "__main__" or (spec is not None and spec.name == module)


def unloadable(label: str, why: str, *, missing: bool) -> SerializationError:
    """Task ``label`` (``name[id]``) succeeded, but its result cannot be loaded here.

    ``missing``: a module or class the result names is missing here (``why`` says which),
    else what it names was found, and rebuilding the value from its state failed.
    """
    plain = "return plain values (numbers, strings, lists, dicts, numpy arrays)"
    advice = f"{_if_missing(why)}, or {plain}" if missing else f"{_REBUILD_FAILED}; or {plain}"
    return SerializationError(
        f"task {label} succeeded, but its result cannot be loaded in this process ({why}): {advice}"
    )


def unloadable_values(label: str, why: str, *, missing: bool | None) -> SerializationError:
    """The values cell ``label`` bound cannot be loaded in this kernel: none is bound.

    ``missing``: as for :func:`unloadable`; ``None`` when ``why`` says it all (a notebook
    object the values name is no longer known here).
    """
    advice = "" if missing is None else f": {_if_missing(why) if missing else _REBUILD_FAILED}"
    return SerializationError(
        f"the values cell {label!r} bound cannot be loaded in this kernel ({why}){advice}; "
        "none of them was bound"
    )


def unloadable_value(why: str, *, missing: bool | None) -> str:
    """Why one value a cell bound did not come back: it cannot be loaded in this kernel.

    ``missing``: as for :func:`unloadable_values`.
    """
    advice = "" if missing is None else f": {_if_missing(why) if missing else _REBUILD_FAILED}"
    return f"its value cannot be loaded in this kernel ({why}){advice}"


def not_kept(label: str) -> BlobError:
    """Task ``label`` succeeded, and its store kept no value: never ``None`` in its place."""
    return BlobError(
        f"task {label} succeeded, but its result was not kept (ignore_result=True, or no "
        "result backend): only the handle that sent it got the value. Keep the results "
        "of tasks you read again by id (ignore_result=False)"
    )


def revoked(label: str, data: Mapping[str, Any]) -> TaskRevoked:
    """Task ``label`` was revoked, with the reason its event gives."""
    reason = data.get("reason")
    why = f": {reason}" if reason and reason != "revoked" else ""
    return TaskRevoked(f"task {label} was revoked{why}")


def worker_lost(label: str, task_id: str, data: Mapping[str, Any]) -> WorkerLost:
    """The worker running task ``label`` was lost, and the task was not run again.

    Lost, not died: the reason says what is known (a process that died, or a worker
    that stopped answering, which may have been paused or cut off). Or, for a later
    step of a chain (``upstream`` in ``data``), the earlier step's was.
    """
    upstream = data.get("upstream")
    if isinstance(upstream, str) and upstream:
        why = (
            f"task {label} was not run: the worker running an earlier task in its chain "
            f"({upstream}) was lost, and that task was not run again"
        )
        return WorkerLost("WorkerLost", why, "", task_id)
    why = (
        f"the worker running task {label} was lost "
        f"({data.get('reason', 'no reason known')}); it was not run again (early "
        "ack, or acks_late with reject_on_worker_lost=False)"
    )
    return WorkerLost("WorkerLost", why, "", task_id)


def _shown_lines(data: Mapping[str, Any]) -> list[str]:
    """A FAILURE event's ``shown_traceback`` (IPython's coloured lines); empty without."""
    shown = data.get("shown_traceback")
    if not isinstance(shown, list):
        return []
    return [str(line) for line in shown]


def task_exception(task_id: str, data: Mapping[str, Any], original: object) -> BaseException:
    """The task's own exception when it travelled and loads here, else a RemoteError.

    Either way the worker's traceback comes along: as the original's ``__cause__`` (a
    :class:`RemoteError` holding it, printed first, as for a chained exception) and
    in IPython as the traceback shown.
    """
    kind = _KNOWN_FAILURES.get(str(data.get("ename", "")), RemoteError)
    remote = kind(
        str(data.get("ename", "Exception")),
        str(data.get("evalue", "")),
        str(data.get("traceback", "")),
        task_id,
        str(data.get("etype", "")),
        shown_traceback=_shown_lines(data),
    )
    # Not an Exception (SystemExit, KeyboardInterrupt): raised as is here it would end
    # the caller's program, or pass for the user's own Ctrl-C.
    if kind is not RemoteError or not isinstance(original, Exception):
        return remote
    try:
        original.__cause__ = remote
        original.__suppress_context__ = True
        # IPython shows this instead of the local frames, which are nbtask's wait.
        original._render_traceback_ = remote._render_traceback_  # type: ignore[attr-defined]
        original.task_id = task_id  # type: ignore[attr-defined]
        original.remote_traceback = remote.traceback  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type that takes no attributes
        return remote
    return original
