"""A worker whose copy of a notebook's own module differs from the kernel's says so.

A module written beside the notebook is edited and reloaded in the kernel (``%autoreload``,
``importlib.reload``); a worker process that imported it for an earlier cell still has its
old copy, which the next cell runs. That cell's output says so, once per module and
worker process; the cell still runs, on the worker's copy.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from helpers import ROOT
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session

CHANGED = "cellcode_probe"  # edited in the kernel between cells
STEADY = "cellcode_steady"  # never edited

SOURCES = {
    CHANGED: "def clean(words):\n    return [w.strip() for w in words]\n",
    STEADY: "class Scale:\n    def times(self, x):\n        return 10 * x\n",
}


def _said_differs(err: str, module: str) -> int:
    return err.count(f"nbtask: this worker's {module} differs from the notebook's")


def _swap_code(ip: InteractiveShell, folder: Path) -> None:
    """What ``%autoreload`` does to a function of an edited module: swap its ``__code__``."""
    run(ip, f"{CHANGED}.clean.__code__ = (lambda words: [w.upper() for w in words]).__code__")


def _write(folder: Path) -> None:
    (folder / f"{CHANGED}.py").write_text(
        "def clean(words):\n    return [w.upper() for w in words]  # edited\n"
    )


def _write_and_reload(ip: InteractiveShell, folder: Path) -> None:
    """The file edited and reloaded in the kernel only (the worker keeps its import)."""
    _write(folder)
    run(ip, f"import importlib\n{CHANGED} = importlib.reload({CHANGED})")


def _autoreload(ip: InteractiveShell, folder: Path) -> None:
    """IPython's own ``%autoreload``: the file edited, reloaded before the next cell runs."""
    run(ip, "%load_ext autoreload\n%autoreload 2")
    try:
        _write(folder)
        run(ip, "pass")  # autoreload reloads the edited module before a cell runs
    finally:
        run(ip, "%autoreload 0")  # off for later tests (IPython cannot unload it)


@pytest.fixture
def local_modules(ip: InteractiveShell, tmp_path: Path) -> Iterator[Path]:
    """Two modules in a folder the notebook puts on ``sys.path`` (it travels with cells)."""
    folder = tmp_path / "beside_the_notebook"
    folder.mkdir()
    for name, source in SOURCES.items():
        (folder / f"{name}.py").write_text(source)
    try:
        run(ip, f"import sys\nsys.path.append({str(folder)!r})")
        yield folder
    finally:
        while str(folder) in sys.path:
            sys.path.remove(str(folder))
        for name in SOURCES:
            module = sys.modules.pop(name, None)
            if module is not None:  # a cell may have shipped it by value: not later tests
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.parametrize(
    "edit", [_swap_code, _write_and_reload, _autoreload], ids=["code", "reload", "autoreload"]
)
def test_a_cell_says_once_that_its_workers_copy_of_a_notebook_module_differs(
    ip: InteractiveShell,
    loaded: Session,
    start_worker: Any,
    local_modules: Path,
    capfd: pytest.CaptureFixture[str],
    edit: Callable[[InteractiveShell, Path], None],
) -> None:
    start_worker(concurrency=1)  # the process that imported the modules runs every cell
    run(ip, f"import {CHANGED}, {STEADY}")
    task(ip, f"import {CHANGED}, {STEADY}\nfirst = {CHANGED}.clean([' a '])")
    assert ip.user_ns["first"] == ["a"]
    task(ip, f"scaled = {STEADY}.Scale().times(2)")
    assert ip.user_ns["scaled"] == 20
    err = capfd.readouterr().err
    assert _said_differs(err, CHANGED) + _said_differs(err, STEADY) == 0, err

    edit(ip, local_modules)
    assert run(ip, f"{CHANGED}.clean([' a '])") == [" A "]  # the kernel runs the edit
    task(ip, f"second = {CHANGED}.clean([' a '])\nalso = {STEADY}.Scale().times(3)")
    err = capfd.readouterr().err
    assert ip.user_ns["second"] == ["a"], "the worker's own copy ran"
    assert ip.user_ns["also"] == 30
    assert _said_differs(err, CHANGED) == 1, err
    assert "restart the workers (%reload_ext nbtask for the embedded cluster)" in err
    assert _said_differs(err, STEADY) == 0, err

    task(ip, f"import {CHANGED}\nthird = {CHANGED}.clean([' b '])")
    task(ip, f"import {STEADY}\nagain = {STEADY}.Scale().times(4)")
    err = capfd.readouterr().err
    assert ip.user_ns["third"] == ["b"]
    assert _said_differs(err, CHANGED) + _said_differs(err, STEADY) == 0, "said once"


def test_a_module_shipped_with_its_code_runs_the_notebooks_and_says_nothing(
    ip: InteractiveShell,
    loaded: Session,
    start_worker: Any,
    local_modules: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A module under the notebook's folder travels by value when a cell reads it."""
    start_worker(concurrency=1)
    before = os.getcwd()
    try:
        run(ip, f"import os\nos.chdir({str(local_modules)!r})\nimport {CHANGED}")
        task(ip, f"import {CHANGED}\nfirst = {CHANGED}.clean([' a '])")
        _swap_code(ip, local_modules)
        task(ip, f"second = {CHANGED}.clean([' a '])")
    finally:
        os.chdir(before)
    assert (ip.user_ns["first"], ip.user_ns["second"]) == (["a"], [" A "])
    assert _said_differs(capfd.readouterr().err, CHANGED) == 0


def _module_fingerprint_in_a_new_process(folder: Path, seed: str, edit: str = "") -> str:
    """``cellcode_probe``'s fingerprint in a new process, after ``edit`` is written and
    the module reloaded there, if given."""
    program = textwrap.dedent(
        f"""
        import importlib, pathlib, sys
        sys.path.insert(0, {str(folder)!r})
        import {CHANGED}
        from nbtask.core.fingerprint import module_fingerprint
        if sys.argv[1]:
            pathlib.Path({CHANGED}.__file__).write_text(sys.argv[1])
            importlib.reload({CHANGED})
        print(module_fingerprint({CHANGED}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", program, edit],
        env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return out.stdout.strip()


def test_a_module_reloaded_has_the_fingerprint_of_its_file_imported_fresh(tmp_path: Path) -> None:
    """By name, not by the order a reload left its names in; set constants, line numbers
    and the hash seed change nothing."""
    probe = tmp_path / f"{CHANGED}.py"
    probe.write_text(
        "def first(w):\n    return w in {'alpha', 'beta', 'gamma'}\n\n"
        "class Words:\n    def count(self, ws):\n        return len(ws)\n"
    )
    before = _module_fingerprint_in_a_new_process(tmp_path, "1")
    assert before.startswith(f"py{sys.version_info[0]}.{sys.version_info[1]}:")
    edited = (
        "\n\ndef inserted(w):\n    return w.strip()\n\n"
        "def first(w):\n    return w in {'alpha', 'beta', 'gamma'}\n\n"
        "class Words:\n    def count(self, ws):\n        return len(ws)\n"
    )
    reloaded = _module_fingerprint_in_a_new_process(tmp_path, "2", edited)
    assert reloaded != before
    assert probe.read_text() == edited
    assert _module_fingerprint_in_a_new_process(tmp_path, "3") == reloaded  # imported fresh
    probe.write_text(edited.replace("len(ws)", "len(ws) + 0"))  # a method edited
    assert _module_fingerprint_in_a_new_process(tmp_path, "1") != reloaded
