"""The threads of tasks in a worker process: those neither it nor nbtask runs.

A thread a cell or task leaves running may change the process's state, or use its cell's
namespace, after the cell ended: what a worker keeps between cells is judged by them.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["alive", "running"]


def alive() -> bool:
    """Whether a thread other than this one and the process's own is alive."""
    return bool(running())


def running() -> set[int | None]:
    """The threads alive other than this one and the process's own, by ident.

    Threads are counted by their frames too: one started with ``_thread.start_new_thread``
    (as some libraries do) runs Python code, once begun, that :mod:`threading` does not list.
    """
    threads = threading.enumerate()
    alive_now = {t.ident for t in threads} | set(sys._current_frames())
    return alive_now - _own_threads(threads) - {threading.get_ident()}


def _own_threads(threads: list[threading.Thread]) -> set[int | None]:
    """Those of ``threads`` a worker process runs itself: nbtask's are named ``nbtask-*``."""
    return {t.ident for t in threads if t.name.startswith("nbtask-")}
