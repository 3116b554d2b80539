"""A kept value is read where it is held: later cells and function tasks go to its holder."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import cell_task as task
from holding import (
    TOTAL,
    StartWorker,
    delete_store_copies,
    keep_x,
)
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.errors import BlobError
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session


@pytest.mark.brokers()
def test_a_follow_up_cell_runs_on_the_holder_and_reads_no_blob(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, settings: Settings
) -> None:
    start_worker(concurrency=2)
    kept = keep_x(ip)
    delete_store_copies(settings)
    task(ip, "total = float(x.sum())", "--wait --out follow_up")
    assert ip.user_ns["total"] == TOTAL  # from the holder's memory: no blob is left
    assert ip.user_ns["follow_up"].queue == kept.holder
    assert ip.user_ns["x"] is kept


@pytest.mark.brokers()
def test_a_function_task_given_a_kept_value_runs_on_its_holder_and_reads_no_blob(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, settings: Settings
) -> None:
    start_worker(concurrency=2)
    kept = keep_x(ip)
    delete_store_copies(settings)

    @shell.app.task
    def total(values: Any, offset: float = 0.0) -> float:
        return float(values.sum()) + offset

    handles = [
        total.delay(kept),
        total.apply_async(kwargs={"values": kept, "offset": 1.0}),
    ]
    assert [h.queue for h in handles] == [kept.holder, kept.holder]
    assert [h.get(timeout=20) for h in handles] == [TOTAL, TOTAL + 1.0]  # no blob is left
    assert total.apply_async((kept,), queue="default").queue == "default"  # a choice wins


def test_a_kept_value_a_function_task_changed_in_place_is_loaded_again_from_its_copy(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker
) -> None:
    """A task gets the live object; one that changes it leaves the kept value as it was."""
    start_worker(concurrency=1)
    kept = keep_x(ip)

    @shell.app.task
    def double_in_place(values: Any) -> float:
        values *= 2
        return float(values[1])

    assert double_in_place.delay(kept).get(timeout=20) == 2.0
    task(ip, "second = float(x[1])")  # the holder sees the change, loads the store copy
    assert ip.user_ns["second"] == 1.0
    assert "x  2.4 MB" in shell.status()  # and holds the value as kept again


def test_status_shows_what_each_process_holds_with_sizes(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker
) -> None:
    start_worker("--data", "squares=tests.sample_tasks:load_squares", concurrency=1)
    task(ip, "n = len(squares)", "--wait --requires squares")
    kept = keep_x(ip)
    status = shell.status()
    assert "queues default,data.squares " in status  # a process's own queue is not listed
    assert "x  2.4 MB from Cell In[" in status
    assert "dataset squares  " in status
    assert f"({kept.holder})" not in status


def test_a_value_changed_in_place_on_its_holder_is_held_as_new(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, settings: Settings
) -> None:
    start_worker(concurrency=1)
    before = keep_x(ip)
    task(ip, "x[0] = -1.0")
    after = ip.user_ns["x"]
    assert isinstance(after, RemoteValue) and after.key != before.key
    delete_store_copies(settings)
    task(ip, "first = float(x[0])")
    assert ip.user_ns["first"] == -1.0
    ip.user_ns["old"] = before  # the reference to the value as it was
    with pytest.raises(BlobError, match="old is lost"):
        task(ip, "first = float(old[0])")
