"""The data path's goals (``benchmarks/data_goals.py``), from made-up runs: nothing is timed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

# Loaded from its file: putting benchmarks/ on sys.path would shadow names such as `run`.
_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "data_goals.py"
_SPEC = importlib.util.spec_from_file_location("data_goals", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
goals = importlib.util.module_from_spec(_SPEC)
sys.modules["data_goals"] = goals
_SPEC.loader.exec_module(goals)


def _run(kept_s: float, embedded_s: float) -> dict[str, Any]:
    return {
        "cell_400mb": {
            "plain": {"s": 1.0},
            "kept": {"s": kept_s},
            "fetched": {"rss_growth_mib": 443.2},
        },
        "embedded": {"arg_50mb_s": embedded_s},
        "dask": {"arg_50mb_s": 0.1},
        "store": {"arg_50mb_s": 0.3},
        "floor_50mb_s": 0.3,
        "cell_2gb": {"rss_growth_mib": 0.15, "preview_s": 3e-5, "follow_up_kernel_io_mb": 1e-4},
    }


def test_each_goal_says_what_was_measured_and_whether_it_is_met() -> None:
    lines = goals.goal_lines(_run(kept_s=1.5, embedded_s=0.09))
    assert len(lines) == 7
    assert "400 MB cell kept remote <= 1.2x its local time: 1.50x (NOT met)" in lines
    assert "50 MB argument, embedded cluster <= Dask's LocalCluster: 0.90x Dask (met)" in lines
    assert "400 MB cell fetched: at most one copy in the kernel: 1.16 copies (met)" in lines


def test_a_goal_whose_numbers_were_not_measured_is_left_out() -> None:
    run = _run(kept_s=1.1, embedded_s=0.2)
    del run["cell_2gb"], run["store"]
    lines = goals.goal_lines(run)
    assert len(lines) == 3 and all("2 GB" not in line for line in lines)
    assert "400 MB cell kept remote <= 1.2x its local time: 1.10x (met)" in lines
    assert "50 MB argument, embedded cluster <= Dask's LocalCluster: 2.00x Dask (NOT met)" in lines
