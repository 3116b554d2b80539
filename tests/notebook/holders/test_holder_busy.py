"""A busy holder: work on its value goes to an idle process, unless the value is too large
to move or no process is idle."""

from __future__ import annotations

import os
import time
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
    read,
    running_on,
)
from IPython.core.interactiveshell import InteractiveShell
from worker_process import WorkerProcess

from nbtask import Settings, TaskHandle
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session
from nbtask.wire.events import State


def occupy_holder(
    ip: InteractiveShell, shell: Session, kept: RemoteValue, gate: Path
) -> TaskHandle:
    """Run a cell on ``kept``'s holder until ``gate`` exists; return once the registry says so."""
    ip.user_ns["gate"] = str(gate)
    task(ip, HOLD_UNTIL_GATE, "--out busy")
    busy: TaskHandle = ip.user_ns["busy"]
    assert busy.queue == kept.holder
    wait_until(lambda: running_on(shell, kept.holder or "") == busy.id, 20, "the holder busy")
    return busy


def pids_of(worker: WorkerProcess) -> set[int]:
    return {child.pid for child in worker.children()}


def busy_holder_and_an_idle_worker(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, tmp_path: Path
) -> tuple[RemoteValue, int, WorkerProcess, TaskHandle]:
    """Two one-process workers; ``x`` kept on one, which is then kept busy (until the gate).

    Returns ``x``, its holder's pid, the other (idle) worker and the busy cell's handle.
    """
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    kept = keep_x(ip)
    holder, holder_pid = holder_of(shell, kept, workers)
    [idle] = [w for w in workers if w is not holder]
    return kept, holder_pid, idle, occupy_holder(ip, shell, kept, tmp_path / "gate")


@pytest.mark.brokers()
def test_a_cell_on_a_value_whose_holder_is_busy_runs_on_an_idle_process_which_holds_it_then(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    settings: Settings,
    tmp_path: Path,
) -> None:
    kept, holder_pid, idle, busy = busy_holder_and_an_idle_worker(ip, shell, start_worker, tmp_path)
    task(ip, "import os\ntotal = float(x.sum())\nwhere = os.getpid()", "--wait --out moved")
    assert ip.user_ns["moved"].queue == settings.default_queue
    assert ip.user_ns["total"] == TOTAL and ip.user_ns["where"] in pids_of(idle)
    assert not busy.done()  # it did not wait for the holder
    # That process loaded the store copy and holds x now; the notebook's x names it, so
    # the next cell goes there and reads no blob.
    assert kept.holder_pid == ip.user_ns["where"] != holder_pid
    assert holder_of(shell, kept, [idle])[1] == kept.holder_pid
    delete_store_copies(settings)
    task(ip, "import os\nagain = float(x.sum())\nthere = os.getpid()", "--wait --out next")
    assert ip.user_ns["next"].queue == kept.holder
    assert ip.user_ns["again"] == TOTAL and ip.user_ns["there"] == kept.holder_pid
    (tmp_path / "gate").touch()
    busy.get(timeout=20)


@pytest.mark.brokers()
def test_a_function_task_on_a_value_whose_holder_is_busy_runs_on_an_idle_process(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    settings: Settings,
    tmp_path: Path,
) -> None:
    kept, _, idle, busy = busy_holder_and_an_idle_worker(ip, shell, start_worker, tmp_path)

    @shell.app.task
    def total(values: Any) -> tuple[float, int]:
        return float(values.sum()), os.getpid()

    handle = total.delay(kept)
    assert handle.queue == settings.default_queue
    result, pid = handle.get(timeout=20)  # from the store copy, while the holder is busy
    assert result == TOTAL and pid in pids_of(idle) and not busy.done()
    (tmp_path / "gate").touch()
    busy.get(timeout=20)


@pytest.mark.brokers()
def test_work_sent_back_to_back_on_a_kept_value_spreads_before_the_registry_says_busy(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """The second call does not queue behind the first on the holder: it goes elsewhere."""
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    kept = keep_x(ip)
    holder, holder_pid = holder_of(shell, kept, workers)
    [idle] = [w for w in workers if w is not holder]
    held_on = kept.holder
    ip.user_ns["gate"] = str(tmp_path / "gate")
    task(ip, HOLD_UNTIL_GATE, "--out first")  # no waiting for the registry to show it
    task(ip, "import os\ntotal = float(x.sum())\nwhere = os.getpid()", "--wait --out second")
    assert ip.user_ns["first"].queue == held_on
    assert ip.user_ns["second"].queue == settings.default_queue
    assert ip.user_ns["where"] in pids_of(idle) and ip.user_ns["total"] == TOTAL

    assert not ip.user_ns["first"].done()
    (tmp_path / "gate").touch()
    assert read(ip, "head") == 1.0 and ip.user_ns["first"].info["pid"] == holder_pid
    wait_until(lambda: running_on(shell, held_on or "") == "", 20, "the first holder idle")

    @shell.app.task
    def total(values: Any, gate: str = "") -> tuple[float, int]:
        while gate and not os.path.exists(gate):
            time.sleep(0.05)
        return float(values.sum()), os.getpid()

    # The same for function tasks; x is held by the process the second cell ran on now.
    moved = ip.user_ns["x"]
    calls = [total.delay(moved, str(tmp_path / "gate2")), total.delay(moved)]
    assert [c.queue for c in calls] == [moved.holder, settings.default_queue]
    assert calls[1].get(timeout=20) == (TOTAL, holder_pid)  # while the first still waits
    (tmp_path / "gate2").touch()
    assert calls[0].get(timeout=20)[0] == TOTAL


@pytest.mark.brokers()
@X_STAYS
def test_a_value_over_move_bytes_waits_for_its_busy_holder(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, tmp_path: Path
) -> None:
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]  # one idle
    kept = keep_x(ip)
    _, holder_pid = holder_of(shell, kept, workers)
    occupy_holder(ip, shell, kept, tmp_path / "gate")
    task(ip, "import os\ntotal = float(x.sum())\nwhere = os.getpid()", "--out queued")
    queued = ip.user_ns["queued"]
    assert queued.queue == kept.holder and queued.state is State.PENDING
    (tmp_path / "gate").touch()
    assert read(ip, "where") == holder_pid and read(ip, "total") == TOTAL


@pytest.mark.brokers()
def test_a_busy_holder_with_no_idle_process_elsewhere_is_waited_for(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=1)
    kept = keep_x(ip)
    _, holder_pid = holder_of(shell, kept, [worker])
    occupy_holder(ip, shell, kept, tmp_path / "gate")
    task(ip, "import os\ntotal = float(x.sum())\nwhere = os.getpid()", "--out queued")
    queued = ip.user_ns["queued"]
    assert queued.queue == kept.holder and queued.state is State.PENDING
    (tmp_path / "gate").touch()
    assert read(ip, "where") == holder_pid and read(ip, "total") == TOTAL


def test_a_process_holding_kept_values_announces_its_tasks_at_once(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # The worker's heartbeats a minute apart: only these announcements show a task in time.
    monkeypatch.setenv("NBTASK_HEARTBEAT_INTERVAL", "60")
    monkeypatch.setenv("NBTASK_VISIBILITY_TIMEOUT", "300")
    start_worker(concurrency=2)
    wait_until(lambda: all(all(i.pids) for i in shell.app.workers().values()), 20, "its children")
    [before] = shell.app.workers().values()
    task(ip, "n = 1", "--wait")  # no process holds anything: its entry is not written again
    assert [info.seen for info in shell.app.workers().values()] == [before.seen]
    kept = keep_x(ip)
    busy = occupy_holder(ip, shell, kept, tmp_path / "gate")  # shown busy within 20 s
    (tmp_path / "gate").touch()
    busy.get(timeout=20)
    wait_until(lambda: running_on(shell, kept.holder or "") == "", 20, "the holder shown idle")
