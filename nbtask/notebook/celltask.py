"""The tasks that carry notebook cells: :class:`CellTask` and named cells.

:class:`CellTask` is the one task (``nbtask.cell``) that runs ``%%task`` cells on the
workers; :class:`NamedCell` is a named cell (``%%task clean``) exposed as a reusable task,
``app.cells["clean"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nbtask.core.refs import blobs_of, noting_refs
from nbtask.core.task import Task
from nbtask.errors import CellError
from nbtask.notebook.analysis import analyze
from nbtask.notebook.cellshell import execute_cell, prepare_cell
from nbtask.notebook.shipping import CellSpec, prepare
from nbtask.wire.blobs import Packed

__all__ = ["CellTask", "NamedCell", "cell_task"]


class CellTask(Task):
    """The task that runs notebook cells on workers (one instance per app)."""

    name = "nbtask.cell"
    abstract = False
    output_descriptors = True  # what its subprocesses and C code print, as in a kernel
    # A cell's own work on the worker (its settings, its shell) takes a millisecond or
    # two, so at the worker's half a millisecond every trivial cell sent a started event:
    # a send there and a read in the notebook, for nothing the notebook shows. One that
    # ends within 10 ms (the cap a burst of its output waits for) says so with its end.
    started_after = 0.01

    def run(self, spec: CellSpec, blob: Packed, **datasets: Any) -> Any:
        """Run ``spec`` with the values packed in ``blob`` and the worker's ``datasets``.

        See :func:`execute_cell`.
        """
        return execute_cell(spec, blob, datasets)

    def before_start(self, task_id: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Make ready for the cell before it runs, uninterrupted (see :func:`prepare_cell`)."""
        spec = args[0] if args else kwargs.get("spec")
        if isinstance(spec, CellSpec):
            prepare_cell(spec)


def cell_task(app: Any) -> CellTask:
    """The app's one :class:`CellTask` (registered on first use)."""
    task = app.tasks.get(CellTask.name)
    if not isinstance(task, CellTask):
        task = app.register_task(CellTask())
    assert isinstance(task, CellTask)
    return task


class NamedCell(Task):
    """A named ``%%task`` cell as a reusable task: ``app.cells["clean"].delay(df=other)``.

    ``delay(**inputs)`` reruns the cell's code with ``inputs`` for some of its free
    variables (the others come from the notebook's namespace at call time); the handle's
    result is ``{name: value}`` for the names the cell assigns.

    Parameters
    ----------
    app
        The app the cell runs on.
    name
        The cell's name (``%%task clean``).
    source, python
        The cell as typed, and as plain Python.
    namespace
        The notebook's namespace, for the inputs not given.
    """

    abstract = False

    def __init__(
        self, app: Any, name: str, source: str, python: str, namespace: Mapping[str, Any]
    ) -> None:
        self.app = app
        self.name = name  # type: ignore[misc]
        self.source = source
        self.python = python
        self.namespace = namespace
        self.inputs = analyze(python).reads

    def _spec(self, inputs: Mapping[str, Any]) -> tuple[CellSpec, Packed]:
        spec, blob, _ = prepare(
            self.source,
            self.python,
            self.namespace,
            filename=f"Cell {self.name}",
            plain=True,
            overrides=inputs,
        )
        return spec, blob

    def apply_async(
        self, args: Any = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Any:
        """Send the cell with ``kwargs`` as inputs; ``options`` as for ``Task.apply_async``.

        Without ``queue=``, the app's routes pick one by the cell's name.
        """
        if args:
            raise CellError(f"cell {self.name!r} takes its inputs by name: .delay(x=...)")
        with noting_refs() as carried:
            spec, blob = self._spec(kwargs or {})
        app = self._client()
        # The kept values it reads: the cell may load them after the notebook released them.
        app.store.pin_blobs(blobs_of(carried))
        queue = options.pop("queue", None) or app.route(self.name)
        options.setdefault("label", self.name)
        return cell_task(app).apply_async((spec, blob), queue=queue, **options)

    def _client(self) -> Any:
        if self.app is None:
            raise CellError(f"cell {self.name!r} is not bound to an App")
        return self.app

    def map(self, inputs: Iterable[Mapping[str, Any]]) -> list[Any]:
        """Send the cell once per mapping of inputs; return the handles.

        Raises
        ------
        CellError
            An item is not a mapping of the cell's inputs by name; nothing was sent.
        """
        items = list(inputs)
        for each in items:
            if not isinstance(each, Mapping):
                raise CellError(
                    f"cell {self.name!r} takes its inputs by name: map() takes one dict per "
                    f"run, {{name: value}} of {list(self.inputs)}, got {each!r}; nothing was sent"
                )
        return [self.apply_async((), dict(each)) for each in items]

    def run(self, **inputs: Any) -> dict[str, Any]:
        """Run the cell here, in this process (plain Python, no magics)."""
        spec, blob = self._spec(inputs)
        namespace: dict[str, Any] = blob.load()
        exec(compile(self.python, spec.filename, "exec"), namespace)
        return {n: namespace[n] for n in spec.assigned if n in namespace}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("namespace", None)  # the notebook's namespace never travels
        return state

    def __repr__(self) -> str:
        return f"<cell {self.name!r} inputs={list(self.inputs)}>"
