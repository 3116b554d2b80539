"""What task code leaves behind stays its own, on both brokers.

A process the task forked neither reports an outcome nor takes messages; a thread it left
running never writes into a later task's output; text written outside any task (a
handler after the outcome) goes to the worker's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import exited, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import App, State
from nbtask.core.holding import holder_queue

pytestmark = pytest.mark.brokers

FINAL_EVENTS = {"success", "failure", "revoked", "worker_lost"}


def end_if_running(pid: int) -> None:
    """Kill a forked copy that outlived its test (it has no supervisor to end it)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        if process.status() != psutil.STATUS_ZOMBIE:
            process.kill()


def final_events(access: RawBroker, app: App, task_id: str) -> list[str]:
    """The final events sent to this client's channel about ``task_id``, in order."""
    types = access.stored_event_types(app.signer, app.channel, task_id)
    return [t for t in types if t in FINAL_EVENTS]


@pytest.mark.parametrize("ending", ["returns", "exits"])
def test_a_process_forked_by_a_task_neither_reports_nor_takes_messages(
    ending: str,
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    worker = start_worker(concurrency=1)
    [child] = worker.children()
    pids = tmp_path / "pids"

    @app.task
    def forks(path: str, ending: str) -> int:
        import sys

        print("before the fork")
        fork = os.fork()
        if fork == 0:  # the copy: its value (or exit) must not become the task's outcome
            if ending == "exits":
                sys.exit(0)
            return -1
        Path(path).write_text(f"{os.getpid()} {fork}")
        return os.getpid()

    @app.task
    def whoami() -> int:
        return os.getpid()

    handle = forks.delay(str(pids), ending)
    assert handle.get(timeout=15) == child.pid
    parent, fork = (int(pid) for pid in pids.read_text().split())
    request.addfinalizer(lambda: end_if_running(fork))
    assert parent == child.pid != fork
    wait_until(lambda: exited(fork), 10, f"the forked copy {fork} to exit")
    assert whoami.delay().get(timeout=15) == child.pid
    assert final_events(access, app, handle.id) == ["success"]
    assert handle.stdout == "before the fork\n"  # the copy sent nothing either
    assert [c.pid for c in worker.children()] == [child.pid]


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_process_a_task_forks_has_pythons_own_sigint_and_sigalrm_handlers(
    how: str,
    app: App,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """In the child, SIGINT terminates the task and SIGALRM is its soft time limit; a process
    the task forks is not the task and has the handlers any Python process starts with.
    SIGINT sent to the fork raises a plain ``KeyboardInterrupt`` there, and the task, which
    waits for the fork, succeeds."""

    @app.task
    def forks_and_waits(path: str, how: str) -> int:
        """Fork; the fork writes its pid and handlers to ``path``, then waits (a minute at
        most) for SIGINT, writes what it raised to ``path.interrupted`` and exits with 3."""
        import multiprocessing
        import time

        def fork_body() -> None:
            try:
                handlers = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGALRM)]
                names = [getattr(h, "__name__", None) or getattr(h, "name", h) for h in handlers]
                Path(path + ".new").write_text(" ".join([str(os.getpid()), *names]))
                os.replace(path + ".new", path)  # seen whole, or not at all
                ends = time.monotonic() + 60
                while time.monotonic() < ends:
                    time.sleep(0.05)
            except KeyboardInterrupt as exc:
                Path(path + ".interrupted").write_text(repr(exc))
                os._exit(3)
            os._exit(0)

        if how == "os.fork":
            fork = os.fork()
            if fork == 0:
                fork_body()
            return os.waitstatus_to_exitcode(os.waitpid(fork, 0)[1])
        process = multiprocessing.get_context("fork").Process(target=fork_body)
        process.start()
        process.join()
        assert process.exitcode is not None
        return process.exitcode

    start_worker(concurrency=1)
    path = tmp_path / "fork"
    handle = forks_and_waits.delay(str(path), how)
    wait_until(path.exists, 15, "the fork to say its handlers")
    fork, sigint, sigalrm = path.read_text().split()
    request.addfinalizer(lambda: end_if_running(int(fork)))
    assert (sigint, sigalrm) == ("default_int_handler", "SIG_DFL")
    os.kill(int(fork), signal.SIGINT)
    assert handle.get(timeout=20) == 3
    assert handle.state is State.SUCCESS
    assert (tmp_path / "fork.interrupted").read_text() == "KeyboardInterrupt()"


def test_output_of_a_thread_a_task_left_running_reaches_no_later_task(
    app: App, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker(concurrency=1)
    ticks = tmp_path / "ticks"

    @app.task
    def leaves_a_thread(path: str) -> None:
        import threading
        import time

        def chatter() -> None:
            while True:
                print("chatter from a thread left running")
                with Path(path).open("a") as f:
                    f.write(".")
                time.sleep(0.02)

        threading.Thread(target=chatter, daemon=True).start()

    @app.task
    def says_hello(path: str) -> tuple[int, int]:
        import time

        first = Path(path).stat().st_size
        print("hello from the second task")
        # The thread prints meanwhile: waited for (a loaded machine can keep it from
        # running for a fixed 0.3 s), up to a bound.
        deadline = time.monotonic() + 10
        while Path(path).stat().st_size == first and time.monotonic() < deadline:
            time.sleep(0.02)
        return first, Path(path).stat().st_size

    first = leaves_a_thread.delay(str(ticks))
    first.get(timeout=15)
    # The task may end before its thread first writes: wait for the file, then for more.
    wait_until(ticks.exists, 10, "the thread to start printing")
    ended = ticks.stat().st_size
    wait_until(lambda: ticks.stat().st_size > ended, 10, "the thread to print after its task")
    second = says_hello.delay(str(ticks))
    before, after = second.get(timeout=30)
    assert after > before, "the thread did not print while the second task ran"
    assert second.stdout == "hello from the second task\n"
    lines = [line for line in worker.log.read_text().splitlines() if "dropped output" in line]
    assert len(lines) == 1, lines
    assert f"dropped output of a thread that task {first.id} left running" in lines[0]


def test_a_handlers_print_goes_to_the_worker_log_not_the_tasks_output(
    app: App, start_worker: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's stdout is then a buffered file, as under a process manager.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    worker = start_worker(concurrency=1)

    class Noisy(app.Task):
        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            print(f"on_success saw {retval} for {task_id}")

    @app.task(base=Noisy)
    def seven() -> int:
        print("seven's own line")
        return 7

    handle = seven.delay()
    assert handle.get(timeout=15) == 7
    line = f"on_success saw 7 for {handle.id}"
    wait_until(lambda: line in worker.log.read_text(), 10, "the handler's line in the log")
    assert handle.stdout == "seven's own line\n"


def test_a_forked_copy_that_sends_a_task_uses_its_own_connection(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    """The copy shares nothing on the wire with the child: a task it sends arrives, and
    the child's own outcome and later tasks are untouched."""
    start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task
    def note(path: str, who: str) -> str:
        with open(path, "a") as f:
            f.write(f"{who}\n")
        return who

    @app.task
    def forks_and_sends(path: str) -> int:
        fork = os.fork()
        if fork == 0:
            note.delay(path, "sent by the copy")
            return -1
        os.waitpid(fork, 0)
        return os.getpid()

    handle = forks_and_sends.delay(str(ledger))
    parent = handle.get(timeout=15)
    assert parent > 0
    wait_until(lambda: ledger.exists() and "copy" in ledger.read_text(), 15, "the copy's task")
    assert note.delay(str(ledger), "after").get(timeout=15) == "after"
    assert final_events(access, app, handle.id) == ["success"]


@pytest.mark.parametrize("stop", ["warm", "cold"])
def test_a_stopping_worker_ends_the_processes_its_tasks_left_running_in_their_group(
    stop: str,
    app: App,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Warm (the task has returned) or cold (it runs): SIGTERM, SIGKILL for the one that
    ignores it, one log line naming them; the process in a session of its own stays.

    The processes keep every file the child had open, the pipes to the supervisor too;
    one SIGTERM still stops the worker (it waits for the child process itself).
    """

    @app.task
    def left_running(path: str, gate: str, hold: bool) -> None:
        """Start four processes and leave them: two in the child's process group that SIGTERM
        ends (a subprocess, a forked copy), one there that ignores it, and one that left the
        group on purpose (a new session). Their pids go to ``path``; with ``hold`` the task
        then runs until ``gate`` exists. Each ends within a minute whatever happens."""
        import subprocess
        import sys
        import time

        def linger(ignore_sigterm: bool) -> int:
            fork = os.fork()
            if fork == 0:  # a copy of the task's process, files and all
                if ignore_sigterm:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                ends = time.monotonic() + 60
                while time.monotonic() < ends:
                    time.sleep(0.05)
                os._exit(0)
            return fork

        sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
        pids = [
            subprocess.Popen(sleep).pid,
            linger(ignore_sigterm=False),
            linger(ignore_sigterm=True),
            subprocess.Popen(sleep, start_new_session=True).pid,
        ]
        Path(path).write_text(" ".join(map(str, pids)))
        ends = time.monotonic() + 60
        while hold and not os.path.exists(gate) and time.monotonic() < ends:
            time.sleep(0.05)

    worker = start_worker(concurrency=1)
    pids_file, gate = tmp_path / "pids", tmp_path / "gate"
    request.addfinalizer(gate.touch)
    handle = left_running.delay(str(pids_file), str(gate), hold=stop == "cold")
    if stop == "warm":
        handle.get(timeout=15)

    def pids() -> list[int]:
        return [int(pid) for pid in pids_file.read_text().split()] if pids_file.exists() else []

    wait_until(lambda: len(pids()) == 4, 15, "the task to start its processes")
    subprocess_, copy, stubborn, daemon = pids()
    for pid in (subprocess_, copy, stubborn, daemon):
        request.addfinalizer(lambda pid=pid: end_if_running(pid))
    if stop == "warm":
        log = worker.stops_on_one_sigterm()
    else:
        worker.end()
        log = worker.log.read_text()
    for pid in (subprocess_, copy, stubborn):
        assert exited(pid), f"process {pid} the task left running outlived its worker"
    assert not exited(daemon), "a process in a session of its own was ended"
    [line] = [line for line in log.splitlines() if "that tasks left running" in line]
    assert "ended 3 process(es) that tasks left running: " in line, line
    assert f"{subprocess_} (" in line and f"{copy} (" in line, line
    assert f"{stubborn} (" in line and ", SIGKILL)" in line.split(f"{stubborn} (")[1], line
    assert line.count("SIGKILL") == 1, line


@pytest.mark.parametrize("ending", ["time_limit", "terminate", "crash"])
def test_a_killed_or_dead_child_is_replaced_and_what_its_task_left_running_is_ended(
    ending: str,
    app: App,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Killed past its hard time limit or a terminate's grace, or dead by itself: the
    processes the task started in the child's process group are ended as the child is
    replaced (SIGTERM, SIGKILL for the one that ignores it, one log line naming the task),
    not when the worker stops; the process in a session of its own stays, and the worker
    serves on."""

    @app.task
    def runs_away(path: str, crash: bool) -> None:
        """Start three processes (a ``sleep 300``, a fork that ignores SIGTERM, a
        ``sleep 300`` in a session of its own), write their pids, then crash or run on,
        deaf to everything but SIGKILL. The fork ends within a minute whatever happens."""
        import subprocess
        import time

        fork = os.fork()
        if fork == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ends = time.monotonic() + 60
            while time.monotonic() < ends:
                time.sleep(0.05)
            os._exit(0)
        pids = [
            subprocess.Popen(["sleep", "300"]).pid,
            fork,
            subprocess.Popen(["sleep", "300"], start_new_session=True).pid,
        ]
        Path(path + ".new").write_text(" ".join(map(str, pids)))
        os.replace(path + ".new", path)  # seen whole, or not at all
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            with contextlib.suppress(BaseException):
                time.sleep(30)

    @app.task
    def whoami() -> int:
        return os.getpid()

    worker = start_worker(concurrency=1)
    [child] = worker.children()
    pids_file = tmp_path / "pids"
    handle = runs_away.apply_async(
        (str(pids_file), ending == "crash"), time_limit=2 if ending == "time_limit" else None
    )
    wait_until(pids_file.exists, 15, "the task to start its processes")
    sleeper, stubborn, daemon = (int(pid) for pid in pids_file.read_text().split())
    for pid in (sleeper, stubborn, daemon):
        request.addfinalizer(lambda pid=pid: end_if_running(pid))
    if ending == "terminate":
        assert app.revoke(handle.id, terminate=True, grace=0.5)
    handle.get(timeout=20, propagate=False)
    ended_as = {"time_limit": State.FAILURE, "terminate": State.REVOKED, "crash": State.WORKER_LOST}
    assert handle.state is ended_as[ending]
    wait_until(lambda: exited(sleeper) and exited(stubborn), 30, "the task's processes to end")
    assert not exited(daemon), "a process in a session of its own was ended"
    assert whoami.delay().get(timeout=15) != child.pid
    assert worker.process.poll() is None
    [line] = [line for line in worker.log.read_text().splitlines() if "left running" in line]
    assert f"ended 2 process(es) that task {handle.id} left running: " in line, line
    assert f"{sleeper} (sleep)" in line, line
    assert f"{stubborn} (" in line and ", SIGKILL)" in line.split(f"{stubborn} (")[1], line


@pytest.mark.brokers("amqp")
def test_a_dead_worker_whose_task_left_a_fork_running_is_cleaned_up_while_the_fork_runs(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """RabbitMQ ends a connection once its last copy is closed. A fork that kept a copy of
    its child's would keep the dead worker's consumer on its process's own queue (served
    once the process held a value), which another worker could then not delete: the dead
    worker's entry would stay (shown as having stopped sending heartbeats) until the fork
    ended. The fork closes its copies as it starts."""
    doomed = start_worker(concurrency=1)
    gate = tmp_path / "gate"
    request.addfinalizer(gate.touch)

    @app.task
    def holds_and_leaves_a_fork(gate: str) -> tuple[int, int]:
        """Hold a value (the child serves its own queue from then on), then fork."""
        import time

        from nbtask.core.context import current_request
        from nbtask.core.holding import HeldValue

        holding = current_request().holding
        assert holding is not None
        holding.hold("a-key", HeldValue([1], "value", 8, "a task"))
        fork = os.fork()
        if fork == 0:  # runs on until the gate opens (two minutes at most)
            ends = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < ends:
                time.sleep(0.05)
            os._exit(0)
        return os.getpid(), fork

    @app.task
    def whoami() -> int:
        return os.getpid()

    child, fork = holds_and_leaves_a_fork.delay(str(gate)).get(timeout=15)
    request.addfinalizer(lambda: end_if_running(fork))
    # Taken by a fetch from both queues: the child consumes its own one now.
    assert whoami.delay().get(timeout=15) == child == doomed.children()[0].pid
    [(worker_id, info)] = [(w, i) for w, i in app.workers().items() if i.pid == doomed.pid]
    start_worker(concurrency=1)  # cleans up after the dead one
    doomed.kill_whole()  # the whole worker at once: none of it cleans up
    doomed.process.wait()
    registry = access.keys
    wait_until(
        # Live, then dead: a heartbeat that lapses between the two reads is not missed.
        lambda: worker_id not in {*registry.workers(), *registry.dead_workers()},
        60,
        "the dead worker's entry to be cleaned up",
    )
    assert not access.queue_exists(holder_queue(info.consumers[0]))
    assert not exited(fork), "the fork ended first: nothing was shown"
