"""The data path's goals (``benchmarks/data_goals.py``), from made-up runs: nothing is timed."""

from __future__ import annotations

from typing import Any

from helpers import benchmark_module

goals = benchmark_module("data_goals")


def _run(kept_s: float, embedded_s: float) -> dict[str, Any]:
    return {
        "cell_400mb": {  # warm medians (s) beside first runs in a process (s_first)
            "plain": {"s": 1.0, "s_first": 2.0},
            "kept": {"s": kept_s, "s_first": 1.0},
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
    assert len(lines) == 8
    assert "400 MB cell kept remote <= 1.2x its local time (warm runs): 1.50x (NOT met)" in lines
    assert "50 MB argument, embedded cluster <= Dask's LocalCluster: 0.90x Dask (met)" in lines
    assert "400 MB cell fetched: at most one copy in the kernel: 1.16 copies (met)" in lines


def test_a_goal_whose_numbers_were_not_measured_is_left_out() -> None:
    run = _run(kept_s=1.1, embedded_s=0.2)
    del run["cell_2gb"], run["store"]
    lines = goals.goal_lines(run)
    assert len(lines) == 4 and all("2 GB" not in line for line in lines)
    assert "400 MB cell kept remote <= 1.2x its local time (warm runs): 1.10x (met)" in lines
    assert "50 MB argument, embedded cluster <= Dask's LocalCluster: 2.00x Dask (NOT met)" in lines


def test_the_400mb_first_runs_are_compared_beside_the_goal_for_information_only() -> None:
    lines = goals.goal_lines(_run(kept_s=1.5, embedded_s=0.09))
    goal = lines.index(
        "400 MB cell kept remote <= 1.2x its local time (warm runs): 1.50x (NOT met)"
    )
    assert lines[goal + 1] == (
        "400 MB cell kept remote, first run in a process, beside its local first run: "
        "0.50x (for information)"
    )


def test_a_run_without_first_run_figures_still_checks_the_400mb_goal() -> None:
    run = _run(kept_s=1.1, embedded_s=0.09)
    del run["cell_400mb"]["kept"]["s_first"]
    lines = goals.goal_lines(run)
    assert "400 MB cell kept remote <= 1.2x its local time (warm runs): 1.10x (met)" in lines
    assert len(lines) == 7 and all("first run" not in line for line in lines)
