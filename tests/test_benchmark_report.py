"""The pure half of ``benchmarks/compare.py``: medians, ratios, goals, the README block.

Made-up runs only: nothing here starts a worker or times anything.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import benchmark_module

report = benchmark_module("compare_report")


def _system(
    p50: float, loop: float, batch: float, cell: float, plain: float = 6.0
) -> dict[str, Any]:
    return {
        "latency": {"p50_us": p50, "p99_us": 2 * p50},
        "throughput_loop": {"tasks_per_s": loop},
        "throughput_batch": {"tasks_per_s": batch},
        "data_50mb": {"median_s": 0.4},
        "progress": {"spaced": {"seen": 100, "p50_ms": 1.0, "mechanism": "push"}},
        "cell": {
            "plain": {"reply_p50_ms": plain},
            "remote": {"reply_p50_ms": cell},
            "ratio_to_plain": cell / plain,
        },
    }


def _runs() -> list[dict[str, Any]]:
    runs = []
    for k in (0.9, 1.0, 1.1):  # three rounds, nbtask's p50 varies
        runs.append(
            {
                "floor": _system(400, 3000, 4000, 7.0),
                "nbtask": _system(600 * k, 2500, 3500, 8.4),
                "celery": _system(2000, 600, 500, 14.0),
                "dask": _system(11000, 450, 600, 21.0),
                "rq-simple": _system(3000, 500, 480, 12.0),
                "rq-fork": {"error": "exit 1"},
                "ipyparallel": _system(3600, 2600, 380, 20.0),
            }
        )
    return runs


def test_cell_shows_median_and_range_of_the_rounds() -> None:
    assert report.cell([540.0, 600.0, 660.0], ",.0f") == "600 [540\u2013660]"
    assert report.cell([0.5], ".2f") == "0.50"
    assert report.cell([], ".2f") == "\u2013"


def test_ratio_to_floor_is_oriented_so_above_one_is_slower() -> None:
    runs = _runs()
    assert report.ratio_to_floor(runs, "nbtask", report.ROW["rt_p50"]) == pytest.approx(1.5)
    # tasks/s: floor 3000, nbtask 2500 -> nbtask is 1.2x slower
    assert report.ratio_to_floor(runs, "nbtask", report.ROW["tp_loop"]) == pytest.approx(1.2)


def test_goals_are_computed_from_the_same_run() -> None:
    goals = {g.text: g for g in report.goals(_runs())}
    rt = goals["round trip p50: Celery / nbtask"]
    assert rt.ratio == pytest.approx(2000 / 600) and rt.met is True
    loop = goals["throughput, one submit per task: nbtask / Celery"]
    assert loop.ratio == pytest.approx(2500 / 600) and loop.met is True
    batch = goals["throughput, batch API: nbtask / Celery"]
    assert batch.ratio == pytest.approx(3500 / 500) and batch.met is True
    cell = goals["`%%task --wait` cell / plain cell (at most)"]
    assert cell.ratio == pytest.approx(8.4 / 6.0) and cell.met is True


def test_a_peer_ahead_on_one_small_task_case_fails_that_goal_and_says_where() -> None:
    goals = {g.text: g for g in report.goals(_runs())}
    ipp = goals["ahead of ipyparallel on every small-task case (least lead)"]
    assert ipp.met is False
    assert "throughput, one submit per task" in ipp.detail
    assert goals["ahead of Dask LocalCluster on every small-task case (least lead)"].met is True
    # A system that failed in every round gives no verdict rather than a made-up one.
    assert goals["ahead of RQ Worker (fork) on every small-task case (least lead)"].met is None


def test_tables_leave_out_a_system_that_failed_everywhere() -> None:
    text = report.tables(_runs(), [s for s, _ in report.SYSTEMS])
    header = text.splitlines()[0]
    assert "RQ Worker (fork)" not in header and "nbtask (RabbitMQ)" not in header
    assert (
        "| no-op round trip p50 (\u00b5s) | 400 [400\u2013400] | 600 [540\u2013660] | 2,000 [2,"
        in text
    )
    assert "1.50\u00d7" in text


def test_readme_block_replaces_only_the_marked_part() -> None:
    meta = {"started": "2026-01-01 00:00 UTC", "rounds": 3, "versions": {"celery": "5.7.0"}}
    block = report.readme_block(_runs(), meta, ["floor", "nbtask", "celery"], "docs/benchmarks")
    assert block.startswith(report.START) and block.endswith(report.END)
    assert "![latency](docs/benchmarks/latency.png)" in block
    assert "celery 5.7.0" in block
    before = f"intro\n{report.START}\nold table\n{report.END}\noutro\n"
    after = report.replace_block(before, block)
    assert after.startswith("intro\n") and after.endswith("\noutro\n")
    assert "old table" not in after
    # Running it again changes nothing more: the block is found by its markers.
    assert report.replace_block(after, block) == after


@pytest.mark.parametrize(
    "text", ["no markers", f"{report.START}\n{report.END}\n{report.START}\n{report.END}"]
)
def test_readme_without_exactly_one_block_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        report.replace_block(text, f"{report.START}\n{report.END}")
