"""A module beside the notebook imports in a ``%%task`` cell as it does in the kernel.

The kernel imports from its working directory through the ``''`` on its ``sys.path``; a
worker started elsewhere has no such entry. A real kernel against the real Redis and
worker processes started from another folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def test_a_module_beside_the_notebook_imports_on_a_worker_started_elsewhere(
    run_in_kernel: Callable[[str], str], tmp_path: Path
) -> None:
    folder = tmp_path / "notebook"
    (folder / "sub").mkdir(parents=True)
    (folder / "beside_nb.py").write_text("def f():\n    return 'beside-ok'\n")
    (folder / "sub" / "beside_sub.py").write_text("def f():\n    return 'sub-ok'\n")
    run_in_kernel(f"import os, sys\nos.chdir({str(folder)!r})\nassert '' in sys.path")
    run_in_kernel("%%task --wait\nimport beside_nb\nr1 = beside_nb.f()")
    run_in_kernel("os.chdir('sub')")  # '' follows the working directory, as in the kernel
    run_in_kernel("%%task --wait\nimport beside_sub\nr2 = beside_sub.f()")
    assert run_in_kernel("print(r1, r2)") == "beside-ok sub-ok\n"
