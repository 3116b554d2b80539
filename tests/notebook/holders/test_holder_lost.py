"""A value whose holder is gone: what waits for it runs elsewhere, on the store copy."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import cell_task as task
from helpers import wait_until
from holding import (
    HOLD_UNTIL_GATE,
    TOTAL,
    X_STAYS,
    StartWorker,
    delete_store_copies,
    holder_of,
    keep_x,
    queue_behind_busy_holder,
    read,
    running_on,
)
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import Settings
from nbtask.errors import BlobError
from nbtask.notebook.session import Session
from nbtask.wire.events import State


def gone_from_registry(session: Session, worker: WorkerProcess) -> Callable[[], bool]:
    return lambda: all(i.pid != worker.pid for i in session.app.workers().values())


def test_a_cell_on_a_value_whose_holder_died_loads_the_store_copy(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, settings: Settings
) -> None:
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    kept = keep_x(ip)
    holder, _ = holder_of(shell, kept, workers)
    holder.process.kill()  # the whole worker: its queue has no consumer left
    wait_until(gone_from_registry(shell, holder), 20, "the dead worker to leave the registry")
    task(ip, "total = float(x.sum())", "--wait --out follow_up")
    assert ip.user_ns["total"] == TOTAL
    assert ip.user_ns["follow_up"].queue == shell.app.settings.default_queue
    # The process that loaded it holds it now, and the notebook knows: later cells go there.
    [survivor] = [w for w in workers if w is not holder]
    assert holder_of(shell, kept, [survivor])[1] == kept.holder_pid
    delete_store_copies(settings)
    task(ip, "again = float(x.sum())", "--wait --out later")
    assert ip.user_ns["again"] == TOTAL and ip.user_ns["later"].queue == kept.holder


def test_a_cell_sent_as_the_holder_process_is_replaced_loads_the_store_copy(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker
) -> None:
    worker = start_worker(concurrency=1)
    kept = keep_x(ip)
    _, pid = holder_of(shell, kept, [worker])
    os.kill(pid, signal.SIGKILL)  # the supervisor starts another on the same queue
    # Sent to the holder's queue (the registry may not show the new process yet) or to
    # the shared one: either way the new process takes it and loads the store copy.
    task(ip, "total = float(x.sum())")
    assert ip.user_ns["total"] == TOTAL


@pytest.mark.brokers()
@X_STAYS
def test_a_cell_waiting_for_a_holder_whose_worker_dies_runs_elsewhere(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, access: RawBroker
) -> None:
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    holder, busy, queued = queue_behind_busy_holder(ip, shell, workers)
    own = queued.queue  # (the handle names the queue it is moved to once a view asks)
    holder.kill_whole()  # the whole worker at once: none of it cleans up
    queued.get(timeout=60)  # moved by the other worker once the heartbeats lapse
    assert read(ip, "total") == TOTAL  # from the store copy
    # The cell it was running is reported lost, and its queue deleted, once settled.
    wait_until(lambda: busy.state is State.WORKER_LOST, 30, "the running cell to be lost")
    wait_until(lambda: not access.queue_exists(own), 10, "the queue to be deleted")


@pytest.mark.brokers()
@X_STAYS
def test_a_retry_waiting_on_the_queue_of_a_holder_whose_worker_dies_runs_elsewhere(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    access: RawBroker,
    tmp_path: Path,
) -> None:
    """A function task given ``x`` retries on its holder (countdown 0) once a cell is
    queued behind it there: the holder runs that cell, and the retry waits on the holder's
    queue, its record RETRY (on RabbitMQ it may be handed to the busy process, which gives
    it back as it dies). The holder's worker is killed whole: the other worker moves the
    retry to the queue it falls back to, where it runs on the store copy. Before, the move
    took the retry for a task the gone process had started and reported it WORKER_LOST."""
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    kept = keep_x(ip)
    holder, _ = holder_of(shell, kept, workers)
    sent = tmp_path / "sent"

    @shell.app.task(bind=True, max_retries=1)
    def retries_once(self: Any, values: Any, sent: str) -> tuple[float, str]:
        if self.request.retries == 0:
            while not os.path.exists(sent):  # until the cell is queued behind it
                time.sleep(0.05)
            raise self.retry(countdown=0)
        return float(values.sum()), str(self.request.delivery_info["queue"])

    retried = retries_once.delay(kept, str(sent))
    assert retried.queue == kept.holder
    wait_until(lambda: running_on(shell, kept.holder or "") == retried.id, 20, "its first run")
    ip.user_ns["gate"] = str(tmp_path / "gate")  # never made: the cell runs until killed
    task(ip, HOLD_UNTIL_GATE, "--out busy")
    busy = ip.user_ns["busy"]
    assert busy.queue == kept.holder
    sent.touch()
    wait_until(lambda: running_on(shell, kept.holder or "") == busy.id, 20, "the holder busy")
    wait_until(lambda: retried.state is State.RETRY, 20, "the retry")
    eta = access.keys.eta_key(kept.holder or "")
    wait_until(lambda: not access.store.zcard(eta), 20, "the retry back on the holder's queue")
    holder.kill_whole()  # the whole worker at once: none of it cleans up
    # Moved by the other worker once the heartbeats lapse, and run there; its record
    # named that queue from the move on (`nbtask inspect`, its handle read it).
    ran_on_the_fallback_queue(shell, retried, access, kept.holder or "")
    wait_until(lambda: busy.state is State.WORKER_LOST, 30, "the running cell to be lost")


@pytest.mark.brokers()
@X_STAYS
def test_a_retry_parked_for_the_queue_of_a_holder_whose_worker_dies_runs_elsewhere_when_due(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, access: RawBroker
) -> None:
    """A function task given ``x`` retries on its holder with a countdown of 8 s: the retry
    is parked for the holder's queue until then, and only the holder's own worker moves
    what is due there. That worker is killed whole before it is due: the other worker
    parks the retry for the queue it falls back to, due as it was, and it runs there on
    the store copy, its record naming that queue. Before, it stayed parked for the dead
    process's queue for good: the task stayed RETRY, its handle saying no live worker
    consumes that queue."""
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    kept = keep_x(ip)
    holder, _ = holder_of(shell, kept, workers)
    default = shell.app.settings.default_queue

    @shell.app.task(bind=True, max_retries=1)
    def retries_later(self: Any, values: Any) -> tuple[float, str]:
        if self.request.retries == 0:
            raise self.retry(countdown=8)
        return float(values.sum()), str(self.request.delivery_info["queue"])

    retried = retries_later.delay(kept)
    assert retried.queue == kept.holder
    wait_until(lambda: retried.state is State.RETRY, 20, "the retry")
    holder.kill_whole()  # the whole worker at once: none of it cleans up
    # Not due yet: parked, for the holder's queue (or for its fallback one already).
    parked = [access.keys.eta_key(queue) for queue in (kept.holder or "", default)]
    assert sum(access.store.zcard(key) for key in parked) == 1
    ran_on_the_fallback_queue(shell, retried, access, kept.holder or "")


def ran_on_the_fallback_queue(shell: Session, handle: Any, access: RawBroker, own: str) -> None:
    """``handle``'s task ran on the default queue (its record naming it), and the gone
    process's queue ``own`` it was moved off is deleted."""
    default = shell.app.settings.default_queue
    assert handle.get(timeout=60) == (TOTAL, default)
    record = shell.app.store.get_record(handle.id)
    assert record is not None and record.queue == default
    wait_until(lambda: not access.queue_exists(own), 10, "the queue to be deleted")


def test_a_value_lost_with_its_holder_and_its_store_copy_names_itself_and_its_cell(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, settings: Settings
) -> None:
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    kept = keep_x(ip)
    holder, _ = holder_of(shell, kept, workers)
    holder.process.kill()
    wait_until(gone_from_registry(shell, holder), 20, "the dead worker to leave the registry")
    delete_store_copies(settings)
    with pytest.raises(BlobError) as raised:
        task(ip, "total = float(x.sum())")
    message = str(raised.value)
    assert f"x is lost: the worker process that held it ({kept.holder}) is gone" in message
    assert f"Run {kept.made_by} again to make it" in message
    assert "the task" not in message, "a cell's value is made again by its cell, not a task"
    assert kept.made_by.startswith("Cell In[")
