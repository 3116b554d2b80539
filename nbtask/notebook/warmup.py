"""A worker process makes ready for cells once a notebook session uses its worker.

A worker process makes the IPython shell that runs ``%%task`` cells on first use
(:func:`~nbtask.notebook.worker_shell.worker_shell`), and imports the modules whose
settings the notebook ships with each cell (matplotlib's, pandas', numpy's) when it first
applies them: half a second or more, which the first cell each process runs would wait
for. A notebook session says in the store that it uses the workers, and which of those
modules it has (:meth:`~nbtask.notebook.session.Session.start`, renewed while it lives);
each worker process, idle, sees it and calls :func:`warm` once, while the user writes the
first cell. It runs no task: nothing shows as busy or in ``%tasks``, and work that
arrives meanwhile waits for it at most once. A worker that serves no notebook never
imports IPython, so an idle worker stays small.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable

from nbtask.notebook.process_state import STATE_MODULES
from nbtask.notebook.worker_shell import worker_shell

__all__ = ["warm"]

#: What a cell's task is loaded from.
_CELL_TASKS = "nbtask.notebook.celltask"


def warm(modules: Iterable[str]) -> list[str]:
    """Make this process's worker shell, then import the cell machinery and ``modules``.

    Only ``modules`` whose settings a notebook ships
    (:data:`~nbtask.notebook.process_state.STATE_MODULES`) are imported: anyone who can
    write to the store could name others. One missing here is left to the cell, which
    says so.

    Returns
    -------
    list of str
        The modules imported (the cell machinery's first).
    """
    worker_shell()  # first: matplotlib, imported before, would choose another backend
    asked = set(modules)
    wanted = [_CELL_TASKS, *(name for name in STATE_MODULES if name in asked)]
    imported = []
    for name in wanted:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
            imported.append(name)
    return imported
