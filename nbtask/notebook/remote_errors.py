"""A cell's failure on a worker, raised in the notebook as the user's own exception type.

A worker sends a cell's exception as a :class:`~nbtask.errors.RemoteError` naming its type
(``"module.QualName"``) and carrying the worker's traceback; :func:`local_exception` rebuilds
the user's type where it can, its display the worker's traceback, which points at the
cell's own lines. A ``NameError`` for a name the notebook defines says how to send it.
Its frames are the worker's: ``%debug`` (and ``%pdb``) say so in one line instead of
opening the debugger in nbtask's frames, where it was raised again. A ``SyntaxError``,
which IPython shows by its frames (never by ``_render_traceback_``), is shown by the
frames it would have had in the kernel, not by nbtask's.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import re
import sys
import traceback
from collections.abc import Iterable, Mapping, MutableMapping
from types import TracebackType
from typing import Any

from nbtask.core.context import CELL_FRAMES
from nbtask.core.task_errors import task_exception
from nbtask.errors import CellNameError, RemoteError
from nbtask.wire.events import Event

__all__ = [
    "WorkerErrorDebugger",
    "WorkerSyntaxErrors",
    "exception_type",
    "failure_output",
    "local_exception",
    "said_first",
]

#: The built-in ``SyntaxError`` types: made from ``(msg, (filename, lineno, ...))``.
_SYNTAX_ERRORS = (SyntaxError, IndentationError, TabError)
#: The line :func:`said_first` puts above an error, kept for a ``SyntaxError``'s frames.
_SAID_FIRST = "__nbtask_said_first__"
_NOT_DEFINED = re.compile(r"name '(\w+)' is not defined")
_ON_A_WORKER = (
    "nbtask: the error was raised on a worker, and its frames are not in this kernel: "
    "run the cell without %%task to debug it"
)


def local_exception(exc: BaseException, namespace: MutableMapping[str, Any]) -> BaseException:
    """The user's own exception type for a remote failure, showing the remote traceback.

    ``ValueError`` raised in a worker cell is raised as a ``ValueError`` here. The type is
    found from ``etype`` (``"module.QualName"``, sent by the worker with the failure): the
    module is imported if it is not yet (the event is signed, so the name is trusted), and
    types of the notebook itself (``__main__``) come from its namespace; without ``etype``,
    builtins and the namespace are searched by name. Its display is the worker's
    traceback, which points at the cell's own lines. A type that cannot be found or
    rebuilt from its message stays a :class:`RemoteError`.
    """
    unsent = _unsent_name(exc, namespace)
    if unsent is not None:
        return unsent
    if not isinstance(exc, RemoteError):
        return _placed(exc)
    cls = exception_type(exc.etype or None, exc.ename, namespace)
    if cls is None:
        return exc
    try:
        rebuilt = cls(exc.evalue)
    except Exception:
        return exc
    lines = exc.shown_traceback or (
        exc.traceback.rstrip().splitlines() or [f"{exc.ename}: {exc.evalue}"]
    )
    try:
        rebuilt._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
        rebuilt.remote_traceback = exc.traceback  # type: ignore[attr-defined]
        rebuilt.task_id = exc.task_id  # type: ignore[attr-defined]
    except AttributeError:
        return exc
    rebuilt.__suppress_context__ = True
    return rebuilt


def _placed(exc: BaseException) -> BaseException:
    """A worker's ``SyntaxError`` with its place again: as the kernel shows its own.

    It arrives without its ``msg``, ``filename``, ``lineno``... (rebuilt from its ``args``
    and attributes, not by its ``__init__``): made again from ``args``. IPython shows a
    ``SyntaxError`` by its place, its line and a caret (never by ``_render_traceback_``),
    after its cause: the worker's text, which says the same, is not its cause here.
    ``IndentationError`` and ``TabError`` too, which are made as a ``SyntaxError`` is.
    """
    if type(exc) not in _SYNTAX_ERRORS or not isinstance(exc.__cause__, RemoteError):
        return exc  # not a worker's built-in SyntaxError
    try:
        placed = type(exc)(*exc.args)
    except TypeError:  # not the (msg, (filename, lineno, ...)) it is made with
        return exc
    placed.__dict__.update(vars(exc))
    placed.__suppress_context__ = True
    return placed


def failure_output(event: Event) -> dict[str, Any]:
    """A FAILURE event as the ``error`` output a kernel shows for it.

    Its traceback is the one IPython shows for the task's exception raised here
    (``--wait``, or a later cell reading the cell's names): in colour, the cell's lines.
    """
    error = task_exception(event.task_id, event.data, None)
    render = getattr(error, "_render_traceback_", None)
    lines = render() if callable(render) else [str(error)]
    return {
        "output_type": "error",
        "ename": str(event.data.get("ename", "Exception")),
        "evalue": str(event.data.get("evalue", "")),
        "traceback": [str(line) for line in lines],
    }


def said_first(error: BaseException, line: str) -> BaseException:
    """``error``, shown with ``line`` above its traceback (where it came from)."""
    render = getattr(error, "_render_traceback_", None)
    below = render() if callable(render) else traceback.format_exception_only(error)
    shown = [line, *(part.rstrip("\n") for part in below)]
    with contextlib.suppress(AttributeError):  # (a type with __slots__: shown as it is)
        error._render_traceback_ = lambda: shown  # type: ignore[attr-defined]
        # A SyntaxError is shown by its frames instead (WorkerSyntaxErrors): above them.
        setattr(error, _SAID_FIRST, line)
    return error


def _unsent_name(exc: BaseException, namespace: Mapping[str, Any]) -> CellNameError | None:
    """What to do when the worker lacked a name the notebook defines; ``None``: it did not.

    Every name a cell is seen to read is sent, so the cell reached this one unseen: by
    code it builds and runs (``exec(code)``), say. Locally it would have found it. The
    worker's ``NameError`` comes as itself, or as a :class:`RemoteError` naming it.
    """
    if isinstance(exc, RemoteError):
        said = exc.evalue if exc.ename == "NameError" else ""
    else:
        said = str(exc) if type(exc) is NameError else ""
    found = _NOT_DEFINED.fullmatch(said)
    if found is None or found[1] not in namespace:
        return None
    name = found[1]
    error = CellNameError(
        f"name {name!r} is not defined on the worker, though the notebook defines it: the "
        "cell reads it in a way nbtask cannot see (code it builds and runs, as exec(code) "
        f"or %run -i of a file this kernel cannot read), so it was not sent. Name it in "
        f"the cell before that code runs (a line `{name}` is enough)"
    )
    error.remote_traceback = getattr(exc, "remote_traceback", getattr(exc, "traceback", ""))  # type: ignore[attr-defined]
    error.task_id = getattr(exc, "task_id", "")  # type: ignore[attr-defined]
    return error


def exception_type(
    etype: str | None, ename: str, namespace: Mapping[str, Any]
) -> type[BaseException] | None:
    """The exception class named ``etype`` (``"pkg.mod.Outer.Inner"``), or ``None``.

    The split between module and qualified name is not marked, so each split is tried
    from the longest module name down.
    """
    found: Any = None
    if etype:
        parts = etype.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module_name, qualname = ".".join(parts[:cut]), parts[cut:]
            if "<locals>" in qualname:
                break
            if module_name == "__main__":
                found = _walk(namespace.get(qualname[0]), qualname[1:])
            else:
                module = sys.modules.get(module_name)
                if module is None:
                    try:
                        module = importlib.import_module(module_name)
                    except Exception:
                        continue
                found = _walk(module, qualname)
            if found is not None:
                break
    if found is None:
        found = getattr(builtins, ename, None) or namespace.get(ename)
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return None


def _walk(obj: Any, names: Iterable[str]) -> Any:
    for name in names:
        obj = getattr(obj, name, None)
    return obj


class _InTheShell:
    """Stands in for one of the shell's methods (``method``) while installed."""

    method = ""

    def __init__(self, shell: Any) -> None:
        self._shell = shell
        self._own = getattr(shell, self.method)

    def install(self) -> None:
        """Be the shell's method (IPython calls it where it would call its own)."""
        setattr(self._shell, self.method, self)

    def remove(self) -> None:
        """Give the shell back its own method, unless another took over since."""
        if vars(self._shell).get(self.method) is self:
            delattr(self._shell, self.method)


class WorkerErrorDebugger(_InTheShell):
    """The shell's debugger (``%debug``, ``%pdb``), saying that a worker's error has no frames here.

    The exception a ``%%task`` cell raises in the notebook was raised on a worker: the
    frames of this kernel's traceback are nbtask's, which raised it again. For such an
    error, one line says to run the cell without ``%%task`` to debug it; any other error
    is debugged as IPython would.
    """

    method = "debugger"

    def __call__(self, force: bool = False) -> None:
        """Debug the last error, as IPython's ``debugger``, unless a worker raised it."""
        error = getattr(sys, "last_value", None)
        if (force or self._shell.call_pdb) and _raised_on_a_worker(error):
            print(_ON_A_WORKER, file=sys.stderr)
            return
        self._own(force)


def _raised_on_a_worker(error: object) -> bool:
    return isinstance(error, RemoteError) or hasattr(error, "remote_traceback")


class WorkerSyntaxErrors(_InTheShell):
    """The shell's ``showsyntaxerror``, showing a worker's ``SyntaxError`` as the kernel's own.

    IPython shows a ``SyntaxError`` raised as a cell runs below the frames of its
    traceback: for a ``%%task`` cell's, the magic's and nbtask's, which raised it again.
    Here its frames are those it would have had if the cell had run in the kernel: the
    kernel's own above the cell, then the cell's on the worker. A statement of the cell
    that did not compile has none, as IPython shows a cell's. Any other ``SyntaxError``
    is shown as IPython shows it.
    """

    method = "showsyntaxerror"  # (its showtraceback calls it)

    def __call__(self, filename: str | None = None, running_compiled_code: bool = False) -> None:
        """Show the last ``SyntaxError``, as IPython's ``showsyntaxerror``."""
        # As IPython finds it, and kept as the last error (%debug, %tb) as IPython keeps it.
        kind, error, tb = self._shell._get_exc_info()
        frames = _cell_frames(error)
        if frames is None:
            self._own(filename, running_compiled_code)
            return
        shown = [*self._kernel_frames(tb), *frames] if frames else []
        lines = self._shell.SyntaxTB.structured_traceback(kind, error, shown)
        said = getattr(error, _SAID_FIRST, None)
        self._shell._showtraceback(kind, error, [said, *lines] if said else lines)

    def _kernel_frames(self, tb: TracebackType | None) -> list[traceback.FrameSummary]:
        """The frames above the cell's call of ``%%task``: where the kernel ran the cell.

        None when the magic was not called by the shell's ``run_cell_magic``.
        """
        magic = getattr(type(self._shell).run_cell_magic, "__code__", None)
        above = 0
        node = tb
        while node is not None and node.tb_next is not None:
            if node.tb_next.tb_frame.f_code is magic:
                # Without the cell's line that calls it: the worker's frames of the cell.
                return traceback.extract_tb(tb, limit=above)
            above += 1
            node = node.tb_next
        return []


def _cell_frames(error: object) -> list[traceback.FrameSummary] | None:
    """A worker's ``SyntaxError``'s frames in the cell that raised it; ``None``: not one."""
    frames = getattr(error, CELL_FRAMES, None)
    if not isinstance(error, SyntaxError) or not isinstance(frames, list):
        return None
    try:
        # A line the worker could not read (a function of an earlier cell) is read here.
        return [
            traceback.FrameSummary(str(filename), int(lineno), str(name), line=line or None)
            for filename, lineno, name, line in frames
        ]
    except (TypeError, ValueError):  # not the frames a worker sends
        return None
