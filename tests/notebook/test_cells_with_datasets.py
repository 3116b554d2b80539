"""``%%task --requires NAME``: a cell runs where a named dataset is, and reads it by name."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import broker_env
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.core.datasets import DatasetMissing


@pytest.fixture
def with_squares(
    ip: InteractiveShell, settings: Settings, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> InteractiveShell:
    """The extension loaded; one worker holds ``squares``, another (alone on ``bare``, as
    well as ``default``) holds nothing."""
    start_worker("--data", "squares=tests.sample_tasks:load_squares", concurrency=1)
    start_worker("-Q", "default,bare", concurrency=1)
    for key, value in broker_env(settings).items():
        monkeypatch.setenv(key, value)
    ip.run_line_magic("load_ext", "nbtask")
    return ip


def test_a_cell_requiring_a_dataset_reads_it_and_never_ships_it(
    with_squares: InteractiveShell,
) -> None:
    ip = with_squares
    ip.user_ns["squares"] = "the notebook's own, not shipped"
    for _ in range(3):  # each time on the holder, whichever worker is idle
        ip.run_cell_magic("task", "--wait --requires squares", "total = sum(squares) + 1")
        assert ip.user_ns["total"] == 286
    assert ip.user_ns["squares"] == "the notebook's own, not shipped"


def test_a_cell_sent_where_the_dataset_is_not_fails_saying_so(
    with_squares: InteractiveShell,
) -> None:
    with pytest.raises(DatasetMissing, match="holds no dataset 'squares'"):
        with_squares.run_cell_magic(
            "task", "--wait --queue bare --requires squares", "total = sum(squares)"
        )
