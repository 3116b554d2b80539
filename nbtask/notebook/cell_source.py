"""A ``%%task`` cell's source in the kernel, under the name the worker compiles it with.

The worker runs the cell as ``Cell In[N]`` (the kernel's count), its lines shifted below
the ``%%task`` line. A function or class the cell defines comes back with that file
name, whose lines only the kernel has: kept here as IPython keeps a cell's, so
``inspect.getsource`` finds them and a traceback through such a function, raised in the
notebook, shows its lines.
"""

from __future__ import annotations

import linecache
from typing import Any

__all__ = ["keep_cell_source"]


def keep_cell_source(shell: Any, filename: str, python: str, line_offset: int) -> None:
    """Keep ``python`` (the cell as Python) as ``filename``'s lines, below ``line_offset``.

    Its cell number goes into IPython's map of cell files, so a traceback names the frame
    as it names the notebook's own cells (``Cell In[4], line 3``).
    """
    lines = ["\n"] * line_offset + [line + "\n" for line in python.splitlines()]
    # No modification time: linecache.checkcache keeps it, as it keeps IPython's cells.
    linecache.cache[filename] = (len(python), None, lines, filename)
    numbers = getattr(getattr(shell, "compile", None), "_filename_map", None)
    if isinstance(numbers, dict):
        numbers[filename] = shell.execution_count
