"""A holder lets go of what it keeps: over its memory budget, when the notebook deletes the
last reference, when the session ends."""

from __future__ import annotations

import gc

import pytest
from helpers import cell_task as task
from helpers import held_values, wait_until
from holding import (
    TOTAL,
    StartWorker,
    keep_x,
)
from IPython.core.interactiveshell import InteractiveShell

from nbtask import App
from nbtask.notebook.session import Session


def test_over_the_memory_budget_the_least_recently_used_value_is_dropped_and_still_usable(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NBTASK_WORKER_MEMORY_BUDGET", str(4_000_000))  # one 2.4 MB value
    start_worker(concurrency=1)
    keep_x(ip)
    task(ip, "y = np.arange(300_000.0) * 2")
    status = shell.status()
    assert "y  2.4 MB" in status and "x  2.4 MB" not in status
    task(ip, "total = float(x.sum())")  # from the store copy, and held again
    assert ip.user_ns["total"] == TOTAL
    status = shell.status()
    assert "x  2.4 MB" in status and "y  2.4 MB" not in status


def holds(session: Session, name: str) -> bool:
    """Whether any live worker process says it holds a value called ``name``."""
    return any(held.name == name for held in held_values(session.app))


def test_deleting_the_last_reference_in_the_notebook_releases_the_value_on_its_holder(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker
) -> None:
    start_worker(concurrency=1)
    keep_x(ip)
    # The same reference under two names (a local cell reading x would fetch it instead).
    ip.user_ns["also_x"] = ip.user_ns["x"]
    assert holds(shell, "x")
    ip.run_cell("del x")
    gc.collect()
    task(ip, "ping = 1")  # a cell's round trip: the release had every chance to go
    assert holds(shell, "x"), "released while the notebook still referenced it"
    ip.run_cell("del also_x")
    gc.collect()
    wait_until(lambda: not holds(shell, "x"), 20, "the holder to drop the released value")


def test_ending_the_session_releases_what_it_kept(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker
) -> None:
    start_worker(concurrency=1)
    keep_x(ip)
    app = shell.app
    consumers = [c for info in app.workers().values() for c in info.consumers]
    ip.run_line_magic("unload_ext", "nbtask")
    reader = App("reader", settings=app.settings)
    try:
        wait_until(
            lambda: not any(h.values for h in reader.store.holdings(consumers).values()),
            20,
            "the holder to drop what the ended session kept",
        )
    finally:
        reader.close()
