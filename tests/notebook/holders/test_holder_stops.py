"""A holder's worker stopping (warm or cold) or killed while the broker still sees its
connection: what waits on the holder's queue is sent on, the queue deleted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
from helpers import wait_until
from holding import (
    TOTAL,
    X_STAYS,
    StartWorker,
    queue_behind_busy_holder,
    read,
)
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import TaskHandle
from nbtask.notebook.session import Session
from nbtask.wire.events import State


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
        held.holder.kill_whole()  # the whole worker at once: none of it cleans up
        held.queued.get(timeout=60)  # moved by the other worker once the heartbeats lapse
        assert held.lingerer.is_running() and access.queue_exists(held.own)
        gate.touch()  # the connection ends: the running cell's message is back
        wait_until(lambda: held.busy.state is State.WORKER_LOST, 30, "the running cell to be lost")
        wait_until(lambda: not access.queue_exists(held.own), 10, "the queue to be deleted")
