"""A cell that changes the state of a notebook's own module says so: it stays on the worker.

A module beside the notebook may keep state at its top level (a counter, a cache) that its
functions change. A ``%%task`` cell changes the worker's copy; the notebook's module stays
as it was, and the cell's output says so, once per module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session

MODULE = "cellstate_probe"
SOURCE = (
    "STATE = {'count': 0}\nCALLS = 0\n\n"
    "def bump():\n    global CALLS\n    CALLS += 1\n    STATE['count'] += 1\n"
    "    return STATE['count']\n\n"
    "def peek():\n    return STATE['count']\n"
)


def _said(err: str) -> int:
    return err.count(f"nbtask: the cell changed the state of the notebook's module '{MODULE}'")


@pytest.fixture
def beside(ip: InteractiveShell, tmp_path: Path) -> Iterator[Path]:
    """The module in a folder of its own, on ``sys.path``."""
    folder = tmp_path / "beside_the_notebook"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    before = os.getcwd()
    try:
        run(ip, f"import sys\nsys.path.append({str(folder)!r})")
        yield folder
    finally:
        os.chdir(before)
        while str(folder) in sys.path:
            sys.path.remove(str(folder))
        module = sys.modules.pop(MODULE, None)
        if module is not None:  # a cell may have shipped it by value: not later tests
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.parametrize(
    "cell",
    [f"r = {MODULE}.bump()", "r = bump()", f"import {MODULE}\nr = {MODULE}.bump()"],
    ids=["module read", "function read", "module imported"],
)
@pytest.mark.parametrize("by_value", [True, False], ids=["shipped", "imported by the worker"])
def test_a_cell_that_changes_a_notebook_modules_state_says_it_stays_on_the_worker(
    ip: InteractiveShell,
    loaded: Session,
    start_worker: Any,
    beside: Path,
    capfd: pytest.CaptureFixture[str],
    cell: str,
    by_value: bool,
) -> None:
    start_worker(concurrency=1)  # one process: a module it imported stays loaded
    if by_value:  # under the notebook's folder: the module travels with its code
        run(ip, f"import os\nos.chdir({str(beside)!r})")
    run(ip, f"import {MODULE}\nfrom {MODULE} import bump, peek")
    # Loaded on the worker first, without a change: nothing to say.
    task(ip, f"import {MODULE}\nseen = {MODULE}.peek()")
    assert ip.user_ns["seen"] == 0
    assert _said(capfd.readouterr().err) == 0

    task(ip, cell)
    err = capfd.readouterr().err
    assert ip.user_ns["r"] == 1
    assert _said(err) == 1, err
    assert "such changes stay there and this kernel's module is as it was" in err
    # As the README says: the notebook's module is as it was.
    assert run(ip, f"({MODULE}.STATE['count'], {MODULE}.CALLS)") == (0, 0)

    task(ip, cell)
    task(ip, f"again = {MODULE}.peek()")
    assert _said(capfd.readouterr().err) == 0, "said once per module"
