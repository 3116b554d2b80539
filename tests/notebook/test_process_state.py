"""Process-wide state a cell carries: what a cell changed is told apart from what it did not."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import matplotlib
import numpy as np
import pandas as pd
import pytest
from cycler import cycler

from nbtask.notebook import process_state


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
