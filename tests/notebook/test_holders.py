"""Kept values stay live in the worker process that made them, and later cells go there.

A real IPython shell against the real brokers and worker processes, with
``keep_threshold`` lowered to 1 MiB so that a 2.4 MB array is kept. Blob keys are deleted
from the store to show where a value came from: a cell that still works read none.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import pytest
import redis
from helpers import WorkerProcess, held_values, wait_until
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker

from nbtask import App, Settings, TaskHandle
from nbtask.core.holding import holder_queue
from nbtask.errors import BlobError
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session
from nbtask.wire.events import State

MAKE_X = "import numpy as np\nx = np.arange(300_000.0)"
TOTAL = float(np.arange(300_000.0).sum())
StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def move_bytes() -> int:
    """The notebook's ``move_bytes``: the default, unless a test parametrizes its own."""
    return Settings().move_bytes


#: ``x`` (2.4 MB) is too large to move: work on it waits for its holder, busy or not.
X_STAYS = pytest.mark.parametrize("move_bytes", [1024 * 1024], ids=["x-over-move_bytes"])


@pytest.fixture
def settings(settings: Settings, move_bytes: int) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024, move_bytes=move_bytes)


@pytest.fixture
def shell(loaded: Session) -> Session:
    """The extension loaded against the test's broker; each test starts its own workers."""
    return loaded


def keep_x(ip: InteractiveShell) -> RemoteValue:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    assert isinstance(kept, RemoteValue) and kept.holder is not None
    return kept


def delete_store_copies(settings: Settings) -> None:
    """Delete every blob of the test's prefix: what is still usable is held in memory."""
    client = redis.Redis.from_url(settings.result_url or settings.broker_url or "")
    keys = list(client.scan_iter(match=f"{settings.key_prefix}:blob:*", count=1000))
    assert keys, "no store copy was made"
    client.delete(*keys)
    client.close()


def holder_of(session: Session, kept: RemoteValue, workers: list[WorkerProcess]) -> Any:
    """The worker (of ``workers``) and the pid of the process that holds ``kept``."""
    for info in session.app.workers().values():
        for slot, consumer in enumerate(info.consumers):
            if holder_queue(consumer) == kept.holder:
                worker = next(w for w in workers if w.pid == info.pid)
                return worker, info.pids[slot]
    raise AssertionError(f"no live worker process serves {kept.holder}")


def gone_from_registry(session: Session, worker: WorkerProcess) -> Callable[[], bool]:
    return lambda: all(i.pid != worker.pid for i in session.app.workers().values())


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


def read(ip: InteractiveShell, name: str) -> Any:
    """``name`` as a local cell reads it (a name a cell still sends back is waited for)."""
    ip.run_cell(f"_read = {name}", store_history=True).raise_error()
    return ip.user_ns["_read"]


BUSY_FOR_2S = "import time\ntime.sleep(2)\nhead = float(x[1])"


def queue_behind_busy_holder(
    ip: InteractiveShell, shell: Session, workers: list[WorkerProcess], busy_cell: str = BUSY_FOR_2S
) -> tuple[WorkerProcess, TaskHandle, TaskHandle]:
    """Keep ``x``, keep its holder's one process busy (``busy_cell``), queue a cell behind.

    Returns the holder's worker, the busy cell's handle and the queued cell's.
    """
    kept = keep_x(ip)
    holder, _ = holder_of(shell, kept, workers)
    task(ip, busy_cell, "--out busy")
    busy = ip.user_ns["busy"]
    wait_until(lambda: busy.state is not State.PENDING, 20, "the holder to start the first cell")
    task(ip, "total = float(x.sum())", "--out queued")
    queued = ip.user_ns["queued"]
    assert queued.queue == kept.holder and queued.state is State.PENDING
    return holder, busy, queued


@pytest.mark.brokers()
@X_STAYS
def test_a_cell_waiting_for_a_holder_whose_worker_dies_runs_elsewhere(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, access: RawBroker
) -> None:
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    holder, busy, queued = queue_behind_busy_holder(ip, shell, workers)
    own = queued.queue  # (the handle names the queue it is moved to once a view asks)
    for process in [*holder.children(), psutil.Process(holder.pid)]:
        process.kill()  # the whole worker at once: none of it cleans up
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
    for process in [*holder.children(), psutil.Process(holder.pid)]:
        process.kill()  # the whole worker at once: none of it cleans up
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
    for process in [*holder.children(), psutil.Process(holder.pid)]:
        process.kill()  # the whole worker at once: none of it cleans up
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


@pytest.mark.brokers()
@X_STAYS
def test_a_worker_stopping_sends_on_the_cells_waiting_for_its_processes(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, access: RawBroker
) -> None:
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    holder, busy, queued = queue_behind_busy_holder(ip, shell, workers)
    own = queued.queue  # (the handle names the queue it is moved to once a view asks)
    holder.stop()  # warm: the running cell finishes, the queued one goes elsewhere
    assert holder.process.returncode == 0
    busy.get(timeout=20)
    assert read(ip, "head") == 1.0
    queued.get(timeout=20)
    assert read(ip, "total") == TOTAL
    assert not access.queue_exists(own)


def forking_a_lingerer(busy_seconds: float, linger: float) -> str:
    """A cell busy on the holder that first forks a process keeping the holder's sockets.

    The fork keeps the holder's broker connection open after the holder exits: until the
    gate exists, or ``linger`` seconds after, 60 s at most. A fork closes its copies of
    the broker connections as it starts: this one keeps copies made before it forked. It
    closes its other files, and leaves the holder's process group (a worker that stops
    ends what is left in it).
    """
    return f"""import os, stat, time
copies = [
    os.dup(fd)
    for fd in map(int, os.listdir("/proc/self/fd"))
    if os.path.exists(f"/proc/self/fd/{{fd}}")
    and os.readlink(f"/proc/self/fd/{{fd}}").startswith("socket:")
]
if os.fork() == 0:
    os.setsid()
    holder, ends, gone = os.getppid(), time.monotonic() + 60, None
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass
    while not os.path.exists(gate) and time.monotonic() < ends:
        if gone is None and os.getppid() != holder:
            gone = time.monotonic()
        if gone is not None and time.monotonic() > gone + {linger}:
            break
        time.sleep(0.05)
    os._exit(0)
for fd in copies:
    os.close(fd)
time.sleep({busy_seconds})
head = float(x[1])"""


def the_lingerer(worker: WorkerProcess) -> psutil.Process:
    [process] = worker.children()
    wait_until(lambda: bool(process.children()), 20, "the fork")
    [lingerer] = process.children()
    return lingerer


class Lingering(NamedTuple):
    """What :func:`lingering_holder` sets up."""

    holder: WorkerProcess
    busy: TaskHandle
    queued: TaskHandle
    lingerer: psutil.Process
    #: The holder's own queue, where the queued cell waited (its handle names the queue it
    #: is moved to once a view asks).
    own: str


@contextlib.contextmanager
def lingering_holder(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    gate: Path,
    *,
    busy_seconds: float,
    linger: float,
) -> Iterator[Lingering]:
    """Two workers; the holder of ``x`` busy on :func:`forking_a_lingerer`'s cell, a cell
    queued behind it. The lingering fork ends once ``gate`` exists (made on the way out)."""
    ip.user_ns["gate"] = str(gate)
    workers = [start_worker(concurrency=1), start_worker(concurrency=1)]
    busy_cell = forking_a_lingerer(busy_seconds=busy_seconds, linger=linger)
    holder, busy, queued = queue_behind_busy_holder(ip, shell, workers, busy_cell)
    lingerer = the_lingerer(holder)
    try:
        yield Lingering(holder, busy, queued, lingerer, queued.queue)
    finally:
        gate.touch()
        lingerer.wait(10)


@pytest.mark.brokers()
@X_STAYS
def test_a_worker_stopping_sends_on_the_cell_its_process_was_given_but_had_not_started(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    access: RawBroker,
    tmp_path: Path,
) -> None:
    """The queued cell reaches the stopping holder as it ends the busy one (AMQP pushes
    the next message on the acknowledgement) and must come back from it.

    RabbitMQ gives back an unacknowledged delivery when it sees its connection end: the
    lingering fork keeps the holder's socket open past the holder's exit, as a slow or
    loaded broker noticing late would.
    """
    gate = tmp_path / "gate"
    with lingering_holder(ip, shell, start_worker, gate, busy_seconds=2, linger=60) as held:
        held.holder.stop()
        assert held.holder.process.returncode == 0
        held.busy.get(timeout=20)
        held.queued.get(timeout=20)  # while the lingering fork still holds the connection
        assert held.lingerer.is_running()
        assert read(ip, "total") == TOTAL
        assert not access.queue_exists(held.own)


@pytest.mark.brokers()
@X_STAYS
def test_a_worker_stopped_cold_settles_the_cell_its_killed_process_ran_and_moves_the_waiting(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    access: RawBroker,
    tmp_path: Path,
) -> None:
    """Its processes killed, the worker waits for the broker to see their connections end.

    RabbitMQ gives back the running cell's delivery then: here a second after the killed
    holder, whose fork keeps its socket open that long, as a slow or loaded broker would.
    """
    gate = tmp_path / "gate"
    with lingering_holder(ip, shell, start_worker, gate, busy_seconds=60, linger=1) as held:
        held.holder.end()  # cold: the holder is killed while it runs the busy cell
        held.queued.get(timeout=20)
        assert read(ip, "total") == TOTAL
        wait_until(lambda: held.busy.state is State.WORKER_LOST, 20, "the running cell to be lost")
        assert not access.queue_exists(held.own)


@pytest.mark.brokers("amqp")
@X_STAYS
def test_a_holders_queue_still_consumed_when_its_worker_stopped_is_cleaned_up_by_another(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    access: RawBroker,
    tmp_path: Path,
) -> None:
    """Stopped cold, the holder's worker waits a few seconds for RabbitMQ to see its killed
    process's connection end; here a fork keeps it open longer. The worker stops without
    its queue deleted, and the other worker deletes it once it can, settling the running
    cell that RabbitMQ gives back onto it then.
    """
    gate = tmp_path / "gate"
    with lingering_holder(ip, shell, start_worker, gate, busy_seconds=60, linger=60) as held:
        held.holder.end()  # cold: the holder is killed while it runs the busy cell
        held.queued.get(timeout=20)  # moved by the stopping worker all the same
        assert held.lingerer.is_running() and access.queue_exists(held.own)
        gate.touch()  # the connection ends: the running cell's message is back
        wait_until(lambda: held.busy.state is State.WORKER_LOST, 30, "the running cell to be lost")
        wait_until(lambda: not access.queue_exists(held.own), 10, "the queue to be deleted")


@pytest.mark.brokers("amqp")
@X_STAYS
def test_a_dead_holders_queue_the_broker_still_sees_consumed_is_cleaned_up_once_it_does_not(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    access: RawBroker,
    tmp_path: Path,
) -> None:
    """The holder's worker is killed whole, but RabbitMQ keeps its connection (a fork holds
    the socket, as a broker noticing late, or a host gone without a word, would): the
    other worker cannot delete the queue then, and looks again until it can.

    RabbitMQ gives back the running cell's message only once the connection ends, onto the
    holder's queue: left there, that cell would stay running for good.
    """
    gate = tmp_path / "gate"
    with lingering_holder(ip, shell, start_worker, gate, busy_seconds=60, linger=60) as held:
        for process in [*held.holder.children(), psutil.Process(held.holder.pid)]:
            process.kill()  # the whole worker at once: none of it cleans up
        held.queued.get(timeout=60)  # moved by the other worker once the heartbeats lapse
        assert held.lingerer.is_running() and access.queue_exists(held.own)
        gate.touch()  # the connection ends: the running cell's message is back
        wait_until(lambda: held.busy.state is State.WORKER_LOST, 30, "the running cell to be lost")
        wait_until(lambda: not access.queue_exists(held.own), 10, "the queue to be deleted")


HOLD_UNTIL_GATE = (
    "import os, time\nwhile not os.path.exists(gate):\n    time.sleep(0.05)\nhead = float(x[1])"
)


def running_on(session: Session, holder: str) -> str | None:
    """The task the registry says the process serving ``holder`` runs ("" when idle)."""
    for info in session.app.workers().values():
        for consumer, task_id in zip(info.consumers, info.running, strict=False):
            if holder_queue(consumer) == holder:
                return task_id
    return None


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
