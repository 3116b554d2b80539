"""A worker applying a notebook's process-wide state for each cell: applied again only
when something could have changed it (the cell before, another task, a thread), and what the
notebook removed (a variable, a path) removed there too, without taking the worker's own or
leaving one kernel's state to another's cell."""

from __future__ import annotations

import _thread
import os
import pickle
import random
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nbtask.core.context import Request, running
from nbtask.notebook import process_state, task_threads


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each state applied; this test process's threads count as a worker's own."""
    calls: list[object] = []
    real_apply = process_state.apply
    monkeypatch.setattr(
        process_state, "apply", lambda state, **how: calls.append(real_apply(state, **how))
    )
    own = {t.ident for t in threading.enumerate()} | set(sys._current_frames())
    monkeypatch.setattr(task_threads, "_own_threads", lambda _threads: own)
    return calls


def test_a_cell_after_one_that_changed_nothing_does_not_apply_the_state_again(
    restored: None, applied: list[object]
) -> None:
    kernel = process_state.KernelState()
    worker = process_state.Applied()

    def cell(pickled: bytes, body: object = None, *, again: bool = False) -> dict[str, object]:
        with running(Request("id", "cell", (), {}, "q", "host")):
            before = worker.enter(pickled, pickle.loads(pickled), again=again)
            if callable(body):
                body()
            return worker.leave(pickled, before)

    shipped = kernel.pickled()
    assert cell(shipped) == {} and len(applied) == 1
    assert cell(shipped) == {} and len(applied) == 1  # in that state still: not applied
    assert cell(shipped, again=True) == {} and len(applied) == 2  # a retry: applied
    assert list(cell(shipped, np.random.random)) == ["numpy.random"] and len(applied) == 2
    assert cell(shipped) == {} and len(applied) == 3  # the cell before changed it: applied
    with running(Request("other", "task", (), {}, "q", "host")):
        np.random.random()  # another task ran between two cells
    assert cell(shipped) == {} and len(applied) == 4
    np.random.random()
    assert cell(kernel.pickled()) == {} and len(applied) == 5  # another state: applied


def test_a_thread_a_cell_leaves_running_makes_the_next_cell_apply_the_state(
    restored: None, applied: list[object]
) -> None:
    shipped = process_state.KernelState().pickled()
    worker = process_state.Applied()
    go = threading.Event()
    left = threading.Thread(target=go.wait)

    def cell(body: Callable[[], None] = lambda: None) -> None:
        with running(Request("id", "cell", (), {}, "q", "host")):
            before = worker.enter(shipped, pickle.loads(shipped))
            body()
            worker.leave(shipped, before)

    cell()
    cell(left.start)  # found applied; leaves a thread running
    go.set()
    left.join(5)
    cell()  # the thread, gone now, may have changed the state meanwhile: applied
    cell()
    assert len(applied) == 2


def one_cell(worker: process_state.Applied, shipped: bytes) -> Callable[..., object]:
    """Run ``body`` as a cell shipped with ``shipped`` in this process, as a worker does."""

    def cell(body: Callable[[], object] = lambda: None) -> object:
        with running(Request("id", "cell", (), {}, "q", "host")):
            before = worker.enter(shipped, pickle.loads(shipped))
            body()
            return worker.leave(shipped, before)

    return cell


def test_a_path_a_cell_removes_is_back_for_the_next_cell(
    restored: None, applied: list[object]
) -> None:
    """Only additions to sys.path come back; a removal must not outlive the cell here."""
    kernel = process_state.KernelState()
    sys.path.insert(0, "/nbtask-test/added")
    try:
        cell = one_cell(process_state.Applied(), kernel.pickled())
        cell()
        cell(lambda: sys.path.remove("/nbtask-test/added"))
        cell()
        assert "/nbtask-test/added" in sys.path and len(applied) == 2
    finally:
        sys.path.remove("/nbtask-test/added")


def test_a_path_a_cell_removes_is_removed_in_the_notebook_even_one_it_started_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    added = "/nbtask-test/added"
    own = next(p for p in sys.path if p in process_state._OWN_PATH)
    notebook = [*sys.path, added]
    sys.path.append(added)
    before = process_state.capture()
    sys.path[:] = [p for p in sys.path if p not in (own, added)]  # the cell, on the worker
    changed = process_state.changes(before, process_state.capture())
    # (Another test's leftover thread may have changed sys.path meanwhile too.)
    assert {own, added} <= set(changed["sys.path removed"])
    sys.path[:] = notebook  # the notebook still has both
    process_state.KernelState().apply_changes(changed)
    assert own not in sys.path and added not in sys.path


def test_a_thread_threading_does_not_list_makes_the_next_cell_apply_the_state(
    restored: None, applied: list[object]
) -> None:
    """A thread started with _thread (not in threading.enumerate()) may change the state."""
    shipped = process_state.KernelState().pickled()
    cell = one_cell(process_state.Applied(), shipped)
    began, go, done = threading.Event(), threading.Event(), threading.Event()

    def late() -> None:
        began.set()
        go.wait(5)
        random.seed(1234)  # after the cell that started it
        done.set()

    cell(lambda: (_thread.start_new_thread(late, ()), began.wait(5)))
    go.set()
    done.wait(5)
    cell()
    assert len(applied) == 2
    assert random.getstate() == pickle.loads(shipped)["random"]


def test_a_variable_the_notebook_set_then_deleted_is_removed_on_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Else a worker shipped it once would keep it for every later cell."""
    monkeypatch.delenv("NBTASK_TEST_SET_THEN_DELETED", raising=False)
    baseline = process_state.Baseline()
    monkeypatch.setenv("NBTASK_TEST_SET_THEN_DELETED", "a")
    assert baseline.environ_changes() == {"NBTASK_TEST_SET_THEN_DELETED": "a"}
    monkeypatch.delenv("NBTASK_TEST_SET_THEN_DELETED")
    assert baseline.environ_changes() == {"NBTASK_TEST_SET_THEN_DELETED": None}


def test_a_path_the_notebook_added_then_removed_is_removed_on_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Else a worker shipped it once would keep it on its ``sys.path`` for good."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    baseline = process_state.Baseline()
    folder = str(tmp_path)
    sys.path.append(folder)
    assert process_state.capture(baseline)["sys.path"] == [folder]
    assert "sys.path removed" not in process_state.capture(baseline)
    sys.path.remove(folder)
    state = process_state.capture(baseline)
    assert state["sys.path removed"] == [folder]
    sys.path.append(folder)  # as a worker shipped it earlier has it
    process_state.apply(state)
    assert folder not in sys.path


@pytest.mark.parametrize("at_load", [None, "loaded"])
def test_a_variable_the_notebook_changed_then_put_back_is_put_back_on_the_workers(
    monkeypatch: pytest.MonkeyPatch, at_load: str | None
) -> None:
    """Put back as it was at load time, it no longer differs: it is still shipped."""
    name = "NBTASK_TEST_PUT_BACK"
    if at_load is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, at_load)
    baseline = process_state.Baseline()
    shipped: dict[str, str | None] = {}
    for value in ("changed", None, at_load, "again", at_load):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        shipped.update(baseline.environ_changes())
        assert shipped.get(name, at_load) == value


def test_a_path_on_the_workers_own_sys_path_stays_when_the_notebook_removes_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The notebook adding and removing it again does not take the worker's own away."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    baseline = process_state.Baseline()
    folder = str(tmp_path)
    sys.path.append(folder)
    added = process_state.capture(baseline)
    sys.path.remove(folder)
    removed = process_state.capture(baseline)
    sys.path.append(folder)  # the worker's own, as it started
    monkeypatch.setattr(process_state, "_OWN_PATH", frozenset(sys.path), raising=False)
    process_state.apply(added)
    process_state.apply(removed)
    assert folder in sys.path


def test_a_kernels_variables_and_paths_are_not_left_to_another_kernels_cell(
    restored: None, applied: list[object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two notebooks on one worker: each cell finds its own notebook's, and the worker's own."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("NBTASK_TEST_WORKERS_OWN", "worker")
    monkeypatch.delenv("NBTASK_TEST_FIRST_KERNEL", raising=False)
    monkeypatch.delenv("NBTASK_TEST_FIRST_CELL", raising=False)
    first_path, cell_path = str(tmp_path / "first"), str(tmp_path / "cell")
    first = {
        "environ": {"NBTASK_TEST_FIRST_KERNEL": "1", "NBTASK_TEST_WORKERS_OWN": "kernel"},
        "sys.path": [first_path],
    }
    second: dict[str, object] = {"environ": {}, "sys.path": []}
    worker = process_state.Applied()

    def cell(state: dict[str, object], body: Callable[[], None] = lambda: None) -> None:
        with running(Request("id", "cell", (), {}, "q", "host")):
            before = worker.enter(pickle.dumps(state), state)
            body()
            worker.leave(pickle.dumps(state), before)

    def first_cell_sets() -> None:
        os.environ["NBTASK_TEST_FIRST_CELL"] = "set by a cell"
        sys.path.append(cell_path)

    cell(first, first_cell_sets)
    assert os.environ["NBTASK_TEST_WORKERS_OWN"] == "kernel" and first_path in sys.path
    cell(second)
    assert os.environ["NBTASK_TEST_WORKERS_OWN"] == "worker"
    assert "NBTASK_TEST_FIRST_KERNEL" not in os.environ
    assert "NBTASK_TEST_FIRST_CELL" not in os.environ
    assert first_path not in sys.path and cell_path not in sys.path


def test_the_kernels_working_directory_entry_goes_with_each_cell_and_is_taken_off_after(
    restored: None, applied: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's ``''`` is on a worker's sys.path for its cells, not for another kernel's."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    kernel = process_state.Baseline()
    sys.path.insert(0, "")  # the kernel's, already there when nbtask was loaded
    kernel.path = list(sys.path)
    state = process_state.capture(kernel)
    assert state["sys.path"] == [""]
    sys.path.remove("")  # the worker, started elsewhere
    worker = process_state.Applied()
    with running(Request("id", "cell", (), {}, "q", "host")):
        worker.leave(pickle.dumps(state), worker.enter(pickle.dumps(state), state))
        assert sys.path[0] == ""
        other = {"sys.path": []}  # another kernel's cell, whose kernel has no ''
        worker.enter(pickle.dumps(other), other)
    assert "" not in sys.path
