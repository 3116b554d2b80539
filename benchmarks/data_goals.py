"""The data path's goals, checked against one ``bench_data.py`` run (pure: no I/O).

Each goal is a line: what is wanted, what this run measured, and whether it is met; a line
with no goal (marked "for information") gives a figure to read beside the goal before it.
The 400 MB cell's times are the medians of its warm runs (not the first in a process);
its first runs, which touch memory new to the process, are compared on the next line. The
400 MB array is 381.5 MiB; "copies" are the kernel's RSS growth in units of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["goal_lines"]

ARRAY_400MB_MIB = 50_000_000 * 8 / 2**20

#: What is wanted, how it is measured, whether it is met (``None``: no goal), the figure.
Check = tuple[str, Callable[[dict[str, Any]], float], Callable[[float], bool] | None, str]

_CHECKS: list[Check] = [
    (
        "400 MB cell kept remote <= 1.2x its local time (warm runs)",
        lambda o: o["cell_400mb"]["kept"]["s"] / o["cell_400mb"]["plain"]["s"],
        lambda v: v <= 1.2,
        "{:.2f}x",
    ),
    (
        "400 MB cell kept remote, first run in a process, beside its local first run",
        lambda o: o["cell_400mb"]["kept"]["s_first"] / o["cell_400mb"]["plain"]["s_first"],
        None,
        "{:.2f}x",
    ),
    (
        "400 MB cell fetched: at most one copy in the kernel",
        lambda o: o["cell_400mb"]["fetched"]["rss_growth_mib"] / ARRAY_400MB_MIB,
        lambda v: v <= 1.25,
        "{:.2f} copies",
    ),
    (
        "50 MB argument, embedded cluster <= Dask's LocalCluster",
        lambda o: o["embedded"]["arg_50mb_s"] / o["dask"]["arg_50mb_s"],
        lambda v: v <= 1.0,
        "{:.2f}x Dask",
    ),
    (
        "50 MB argument across the store <= 1.3x the raw Redis floor",
        lambda o: o["store"]["arg_50mb_s"] / o["floor_50mb_s"],
        lambda v: v <= 1.3,
        "{:.2f}x floor",
    ),
    (
        "2 GB cell kept: kernel RSS grows < 100 MB",
        lambda o: o["cell_2gb"]["rss_growth_mib"] * 2**20 / 1e6,
        lambda v: v < 100,
        "{:.1f} MB",
    ),
    (
        "2 GB cell kept: its preview in < 0.2 s",
        lambda o: o["cell_2gb"]["preview_s"],
        lambda v: v < 0.2,
        "{:.4f} s",
    ),
    (
        "2 GB value: a follow-up cell moves < 1 MB through the kernel",
        lambda o: o["cell_2gb"]["follow_up_kernel_io_mb"],
        lambda v: v < 1.0,
        "{:.4f} MB",
    ),
]


def goal_lines(out: dict[str, Any]) -> list[str]:
    """One line per goal (or figure for information) this run measured.

    A line whose numbers are missing is left out.
    """
    lines = []
    for wanted, measure, met, form in _CHECKS:
        try:
            value = measure(out)
        except (KeyError, ZeroDivisionError):
            continue
        verdict = "for information" if met is None else "met" if met(value) else "NOT met"
        lines.append(f"{wanted}: {form.format(value)} ({verdict})")
    return lines
