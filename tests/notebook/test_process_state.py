"""Process-wide state a cell carries: what a cell changed is told apart from what it did not."""

from __future__ import annotations

import _thread
import os
import pickle
import random
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from cycler import cycler

from nbtask.core.context import Request, running
from nbtask.notebook import module_settings, process_state, task_threads


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


@pytest.fixture
def restored() -> Iterator[None]:
    state = process_state.capture()
    yield
    process_state.apply(state)


def test_a_draw_from_numpy_random_is_a_change_and_no_draw_is_none(restored: None) -> None:
    before = process_state.capture()
    assert process_state.changes(before, process_state.capture()) == {}
    np.random.random()
    changed = process_state.changes(before, process_state.capture())
    assert list(changed) == ["numpy.random"]
    following = np.random.random()
    process_state.apply(changed)  # the generator as the draw left it: the same next number
    assert np.random.random() == following


def test_environment_variables_set_changed_or_removed_between_snapshots_are_changes(
    restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBTASK_TEST_CHANGED", "before")
    monkeypatch.setenv("NBTASK_TEST_REMOVED", "here")
    before = process_state.capture()
    assert process_state.changes(before, process_state.capture()) == {}
    monkeypatch.setenv("NBTASK_TEST_CHANGED", "after \u00e9")
    monkeypatch.setenv("NBTASK_TEST_ADDED", "new")
    monkeypatch.delenv("NBTASK_TEST_REMOVED")
    assert process_state.changes(before, process_state.capture()) == {
        "environ": {
            "NBTASK_TEST_CHANGED": "after \u00e9",
            "NBTASK_TEST_ADDED": "new",
            "NBTASK_TEST_REMOVED": None,
        }
    }
    baseline = process_state.Baseline()
    monkeypatch.setenv("NBTASK_TEST_ADDED", "newer")
    assert process_state.capture(baseline)["environ"] == {"NBTASK_TEST_ADDED": "newer"}


def test_a_snapshot_taken_just_after_apply_reuses_its_generators_and_still_sees_a_draw(
    restored: None,
) -> None:
    """A worker takes the generators' states it just applied as its snapshot's."""
    shipped = process_state.capture()
    np.random.random()
    random.random()
    process_state.apply(shipped)
    before = process_state.capture(applied=shipped)
    assert before["numpy.random"] is shipped["numpy.random"]
    assert process_state.changes(before, process_state.capture()) == {}
    np.random.random()
    assert list(process_state.changes(before, process_state.capture())) == ["numpy.random"]


def test_the_kernel_state_is_pickled_again_when_it_changes_even_in_place(restored: None) -> None:
    kernel = process_state.KernelState()
    first = kernel.pickled()
    assert kernel.pickled() is first  # unchanged: the same bytes, not pickled again
    np.random.random()
    drawn = kernel.pickled()
    assert drawn != first
    matplotlib.rcParams["font.family"].append("nbtask-test-font")  # a list changed in place
    assert pickle.loads(kernel.pickled())["rcParams"]["font.family"][-1] == "nbtask-test-font"
    matplotlib.rcParams["font.family"].pop()


def test_only_the_rc_params_that_differ_are_set_and_reported(restored: None) -> None:
    shipped = process_state.capture()
    shipped["rcParams"] = {**shipped["rcParams"], "font.size": 17.0}
    before = process_state.capture()
    process_state.apply(shipped)
    assert matplotlib.rcParams["font.size"] == 17.0
    assert process_state.changes(before, process_state.capture()) == {
        "rcParams": {"font.size": 17.0}
    }


def test_a_state_applied_again_is_as_shipped_after_a_change_in_place(restored: None) -> None:
    """A worker keeps the state it was shipped loaded: applying it must not hand it over."""
    shipped = process_state.capture()
    colours = cycler(color=["red", "blue"])
    shipped["rcParams"] = {**shipped["rcParams"], "axes.prop_cycle": colours}
    process_state.apply(shipped)
    matplotlib.rcParams["axes.prop_cycle"] += cycler(lw=[1, 2])  # in place, as a cell may
    process_state.apply(shipped)
    assert matplotlib.rcParams["axes.prop_cycle"] == cycler(color=["red", "blue"])


def test_settings_the_notebook_has_not_imported_are_put_back_as_their_libraries_do(
    restored: None,
) -> None:
    """``None`` from a kernel without matplotlib or pandas: as a fresh process has them."""
    pd.set_option("display.max_rows", 7)
    matplotlib.rcParams["font.size"] = 31.0
    process_state.apply({"rcParams": None, "pandas": None})
    put_back = process_state.capture()
    process_state.apply({"rcParams": None, "pandas": None})  # at the defaults: stays there
    assert process_state.changes(put_back, process_state.capture()) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # options this pandas deprecates
        pd.reset_option("all")
    matplotlib.rc_file_defaults()
    assert process_state.changes(put_back, process_state.capture()) == {}
    assert pd.get_option("display.max_rows") != 7 and matplotlib.rcParams["font.size"] != 31.0


def test_numpy_settings_the_notebook_has_not_imported_are_put_back_as_a_fresh_numpy_has_them(
    restored: None,
) -> None:
    """``None`` from a kernel without numpy: its print options and error handling too."""
    np.set_printoptions(precision=3, suppress=True, formatter={"float": "{:.1f}".format})
    np.seterr(all="raise")
    process_state.apply({"numpy.printoptions": None, "numpy.errors": None})
    fresh = "import numpy as np\nprint(np.get_printoptions(), np.geterr())"
    printed = subprocess.check_output([sys.executable, "-c", fresh], text=True)
    assert printed.strip() == f"{np.get_printoptions()} {np.geterr()}"
    assert np.get_printoptions()["precision"] != 3 and np.geterr()["divide"] != "raise"


@pytest.mark.filterwarnings("ignore:InlineBackend._figure_formats_changed:DeprecationWarning")
def test_the_inline_backend_comes_and_goes_only_with_settings_other_than_its_defaults(
    restored: None,
) -> None:
    """One a cell set up at its defaults (showing a figure) is no change; ``None`` resets."""
    from matplotlib_inline.config import InlineBackend

    backend = InlineBackend.instance()
    formats = backend.figure_formats
    try:
        backend.figure_formats = {"png"}
        before = process_state.capture()
        assert "inline" not in before
        backend.figure_formats = {"svg"}
        changed = process_state.changes(before, process_state.capture())
        assert changed == {"inline": {"figure_formats": {"svg"}}}
        process_state.apply({"inline": None})  # from a notebook whose backend has its defaults
        assert backend.figure_formats == {"png"} and "inline" not in process_state.capture()
    finally:
        backend.figure_formats = formats


def test_pandas_options_are_read_as_get_option_reads_them(restored: None) -> None:
    """Read from pandas' own store (get_option's pattern search costs ~10 µs an option)."""
    pd.set_option("display.max_rows", 7)
    pd.set_option("display.precision", 3)
    options = process_state.capture()["pandas"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # options this pandas deprecates
        expected = {key: pd.get_option(key) for key in options}
    assert options == expected and options["display.max_rows"] == 7
    assert len(options) == len(module_settings.registered_options(pd))


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


def test_a_setting_changed_in_place_is_a_change(restored: None) -> None:
    """A snapshot holds copies of the lists and cyclers the live settings hold."""
    before = process_state.capture()
    matplotlib.rcParams["font.sans-serif"].insert(0, "nbtask-test-font")
    matplotlib.rcParams["axes.prop_cycle"] += cycler(lw=[1] * 10)
    changed = process_state.changes(before, process_state.capture())["rcParams"]
    assert sorted(changed) == ["axes.prop_cycle", "font.sans-serif"]
    assert changed["font.sans-serif"][0] == "nbtask-test-font"
    matplotlib.rcParams["font.sans-serif"].pop(0)


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


def test_a_cycler_key_changed_in_place_is_a_change(restored: None) -> None:
    """change_key renames in place in the cyclers a combined cycle is made of."""
    matplotlib.rcParams["axes.prop_cycle"] = cycler(color="rgb") + cycler(linewidth=[1, 2, 3])
    before = process_state.capture()
    matplotlib.rcParams["axes.prop_cycle"].change_key("color", "markeredgecolor")
    changed = process_state.changes(before, process_state.capture())["rcParams"]
    assert changed["axes.prop_cycle"].keys == {"markeredgecolor", "linewidth"}
    assert before["rcParams"]["axes.prop_cycle"].keys == {"color", "linewidth"}


def test_a_pandas_option_changed_in_place_is_a_change(restored: None) -> None:
    pd.set_option("styler.format.formatter", {"price": "{:.2f}"})
    try:
        before = process_state.capture()
        pd.get_option("styler.format.formatter")["volume"] = "{:,}"
        changed = process_state.changes(before, process_state.capture())["pandas"]
        assert changed == {"styler.format.formatter": {"price": "{:.2f}", "volume": "{:,}"}}
    finally:
        pd.reset_option("styler.format.formatter")


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


def test_settings_are_read_again_only_once_they_changed(
    restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading every pandas option and rcParam on each cell cost more than a small cell."""
    reads: list[str] = []
    for snapshots, kind in (
        (module_settings.pandas_options, "pandas"),
        (module_settings.rc_params, "rc"),
    ):
        read = snapshots._read
        monkeypatch.setattr(
            snapshots, "_read", lambda source, r=read, k=kind: reads.append(k) or r(source)
        )
    process_state.capture()
    first = process_state.capture()
    reads.clear()
    again = process_state.capture()
    assert reads == [] and process_state.changes(first, again) == {}
    pd.set_option("display.max_rows", 7)
    matplotlib.rcParams["font.sans-serif"].insert(0, "nbtask-test-font")
    try:
        changed = process_state.changes(first, process_state.capture())
        assert changed["pandas"] == {"display.max_rows": 7}
        assert changed["rcParams"]["font.sans-serif"][0] == "nbtask-test-font"
        assert sorted(reads) == ["pandas", "rc"]
    finally:
        pd.reset_option("display.max_rows")
        matplotlib.rcParams["font.sans-serif"].pop(0)


def test_numpy_random_states_differing_only_in_their_key_are_not_the_same(
    restored: None,
) -> None:
    """The generator's key array is compared by its bytes (its position may be the same)."""
    np.random.seed(1)
    one = np.random.get_state()
    np.random.seed(2)
    two = np.random.get_state()
    assert one[0] == two[0] and one[2:] == two[2:]  # MT19937, the same position
    assert not module_settings.same(one, two)
    np.random.seed(1)
    assert module_settings.same(one, np.random.get_state())
    floats = np.arange(4.0)
    assert not module_settings.same(floats, floats.astype("f4"))  # another dtype
    assert not module_settings.same(floats, floats.reshape(2, 2))
