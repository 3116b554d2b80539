"""Process-wide state a cell carries: what a cell changed is told apart from what it did not.

How a worker applies it for each cell is in ``test_process_state_applied.py``.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
from cycler import cycler

from nbtask.notebook import module_settings, process_state


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


def test_a_setting_changed_in_place_is_a_change(restored: None) -> None:
    """A snapshot holds copies of the lists and cyclers the live settings hold."""
    before = process_state.capture()
    matplotlib.rcParams["font.sans-serif"].insert(0, "nbtask-test-font")
    matplotlib.rcParams["axes.prop_cycle"] += cycler(lw=[1] * 10)
    changed = process_state.changes(before, process_state.capture())["rcParams"]
    assert sorted(changed) == ["axes.prop_cycle", "font.sans-serif"]
    assert changed["font.sans-serif"][0] == "nbtask-test-font"
    matplotlib.rcParams["font.sans-serif"].pop(0)


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
