"""The handle ``%%task --out h`` binds: the cell's task, whose result is the cell's values."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from nbtask.errors import CellError
from nbtask.notebook.cell_run import CellRun, sent_label
from nbtask.notebook.celltask import CellTask
from nbtask.notebook.kept import RemoteValue

if TYPE_CHECKING:
    from nbtask.core.handle import TaskHandle
    from nbtask.notebook.pending import Pending

__all__ = ["CellHandle", "CellValues", "reattached_cell"]


def reattached_cell(handle: TaskHandle, pending: Pending) -> TaskHandle:
    """What ``app.handle(task_id)`` gives in the notebook: a cell's task as its cell handle.

    A cell's task handle's result is what its worker sent back; its cell handle's, the
    cell's values, as ``%%task --out h`` binds it. A cell this kernel did not send (an
    earlier kernel of the notebook did, before a restart) is tracked from now on: its
    values are written into the notebook by :meth:`CellHandle.get`, or once it ends if it
    ends after nbtask was loaded here (no kernel got them then); never over a name the
    notebook binds. One that ended before stays unwritten until asked: locally its values
    went with the kernel that ran it.
    """
    if handle.name != CellTask.name:
        return handle
    run = next((r for r in pending.runs if r.handle.id == handle.id), None)
    if run is None:
        run = CellRun(handle, sent_label(handle), (), reattached=True)
        pending.add(run, pending=False)
    # It stands in for the task handle: what it does not define is the handle's own.
    return cast("TaskHandle", CellHandle(run, pending))


class CellHandle:
    """A ``%%task`` cell's task, as ``--out h`` binds it: its result is the cell's values.

    :meth:`get` (and :meth:`result`, :meth:`wait`) waits for the cell and returns
    ``{name: value}`` for the names it bound, as ``app.cells["name"].delay().get()``
    returns for a named cell. They are the notebook's objects (``h.get()["df"] is df``),
    as the notebook holds them when first asked: the cell's values are written into the
    notebook first if they were not yet, as a later cell reading one of them would, and a
    name a later cell bound before that is left out. A value kept on the workers is
    fetched where it is read (``h.get()["arr"]``), as a cell reading its name fetches it
    (see :class:`CellValues`). The cell's failure is raised as the task handle's
    ``get()`` raises it.

    Everything else is the task's :class:`~nbtask.core.handle.TaskHandle` (:attr:`handle`):
    ``id``, ``state``, ``stdout``, ``done()``, ``cancel()``, ``revoke()``...

    Parameters
    ----------
    run
        The cell's run.
    pending
        The notebook's runs, which write the cell's values into its namespace.
    """

    def __init__(self, run: CellRun, pending: Pending) -> None:
        self._run = run
        self._pending = pending
        self._values: dict[str, Any] | None = None

    @property
    def handle(self) -> TaskHandle:
        """The cell's task handle (its result is what the worker sent back)."""
        return self._run.handle

    def get(
        self,
        timeout: float | None = None,
        *,
        propagate: bool = True,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """Wait up to ``timeout`` seconds for the cell; its values, ``{name: value}``.

        With ``propagate=False``, a failed cell's error is returned instead of raised.

        Raises
        ------
        TimeoutError
            The cell is not done after ``timeout`` seconds (it keeps running).
        Exception
            The cell failed: as :meth:`nbtask.core.handle.TaskHandle.get` raises it.
        """
        handle = self.handle
        outcome = handle.get(
            timeout, propagate=propagate, disable_sync_subtasks=disable_sync_subtasks
        )
        if handle.error is not None or not handle.done():  # not raised: propagate=False
            return outcome
        return self._delivered()

    def result(self, timeout: float | None = None) -> CellValues:
        """The cell's values, as :meth:`get` (``concurrent.futures.Future``'s name)."""
        self.handle.result(timeout)
        return self._delivered()

    def wait(self, timeout: float | None = None, propagate: bool = True, **_: Any) -> Any:
        """The cell's values, as :meth:`get` (Celery's ``AsyncResult.wait``)."""
        return self.get(timeout, propagate=propagate)

    def _delivered(self) -> CellValues:
        """The values of the finished cell, written into the notebook if not yet."""
        if self._values is None:
            run = self._run
            sent = self.handle.result(0)  # read first: delivering lets go of what it holds
            names = list(sent.get("names", ())) if isinstance(sent, Mapping) else []
            del sent
            if not run.delivered:
                if run.reattached:  # an earlier kernel's cell: not over the notebook's names
                    run.superseded.update(n for n in names if n in self._pending.namespace)
                # Not those a later cell bound meanwhile (once delivered, it marks them all).
                names = [n for n in names if n not in run.superseded]
                # The namespace is written on the kernel's main thread only (pending.py).
                if threading.current_thread() is not threading.main_thread():
                    raise CellError(
                        f"cell {run.label!r} ended, but its values are written into the "
                        "notebook on its main thread: call get() in a cell, or once a "
                        "cell ran after it ended"
                    )
                self._pending.deliver(run, raise_errors=True)
            namespace = self._pending.namespace
            self._values = {n: namespace[n] for n in names if n in namespace}
        return CellValues(self._values, self._pending.fetched)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_run", "_pending", "_values"):
            raise AttributeError(name)
        return getattr(self._run.handle, name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *dir(self._run.handle)})

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused: the handle stays in this kernel (its values are the notebook's)."""
        self.handle.__reduce_ex__(protocol)  # a %%task cell's refusal, a task not done...
        raise CellError(
            f"the handle of cell {self._run.label!r} stands for values in this notebook: "
            "pass the value itself, h.get()['name']"
        )

    def __repr__(self) -> str:
        handle = self.handle
        return f"<CellHandle {self._run.label!r} {handle.name}[{handle.id}] {handle.state}>"


class CellValues(dict[str, Any]):
    """A cell's values, ``{name: value}``, as :meth:`CellHandle.get` returns them.

    A value kept on the workers is fetched where it is read (``values["arr"]``,
    ``values.get("arr")``), as a cell reading ``arr`` fetches it: the notebook's names
    for it are bound to the value fetched, so ``values["arr"] is arr``. Until then it is
    its reference (``.items()`` gives that): what a function task or a ``%%task`` cell
    it is passed to loads on its worker, the bytes never passing through the kernel.

    Parameters
    ----------
    values
        The cell's values, as the notebook holds them.
    fetch
        What fetches a kept value read under a name (the notebook's :class:`Pending`).
    """

    def __init__(self, values: Mapping[str, Any], fetch: Callable[[str, RemoteValue], Any]) -> None:
        super().__init__(values)
        self._fetch = fetch

    def __getitem__(self, name: str) -> Any:
        value = super().__getitem__(name)
        if isinstance(value, RemoteValue):
            value = self._fetch(name, value)
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        """The value of ``name`` (fetched if kept), or ``default``."""
        return self[name] if name in self else default  # noqa: SIM401 (fetched by [])

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Sent to a cell or a task: a plain dict, kept values in it as their references.
        return dict, (dict(self),)
