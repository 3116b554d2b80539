"""What a handle says while its task's process is gone: a child killed while its worker
lives on (and settles the task itself), or a whole worker killed (a live worker of the
queue the task's message was on settles it). The reason names the worker and queue that
hold the task, not the dead child's pid as a worker's nor the queue it was first sent to."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import wait_until

import nbtask
from nbtask import App, State

pytestmark = pytest.mark.brokers

SLOW_MARKER = "tests.sample_tasks.slow_marker"  # acks_late
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"
# Long enough for the registry to be read again (every REFRESH_SECONDS) and the reason shown.
SAID_WITHIN = 20.0


def _pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _reason(handle: nbtask.TaskHandle) -> str:
    wait_until(lambda: handle.waiting_reason is not None, SAID_WITHIN, "a waiting reason")
    return handle.waiting_reason or ""


def test_a_task_whose_child_was_killed_says_its_live_worker_settles_it(
    app: App, start_worker, tmp_path: Path
) -> None:
    """The killed child's task waits behind another task (one child): while it does, its
    handle says the process stopped and its worker (alive) settles it. It said the worker
    stopped sending heartbeats, naming the child's pid as the worker's."""
    worker = start_worker(concurrency=1)
    marker, other, go = tmp_path / "marker", tmp_path / "other", tmp_path / "go"
    h = app.send_task(SLOW_MARKER, (str(marker), 60.0), acks_late=True)
    wait_until(lambda: h.state is State.STARTED, 20, "the task to start")
    # Queued behind it: the next child runs this first, then the killed child's task.
    blocker = app.send_task(WAIT_FOR_FILE, (str(other), str(go), 60.0))
    app.flush()
    child = _pids_in(marker)[0]
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: len(_pids_in(other)) == 1, 20, "the other task to start")

    reason = _reason(h)
    assert h.state is State.STARTED and h.info["pid"] == child
    assert reason == (
        f"the process running it (host {h.info['worker']}, pid {child}) stopped; its worker "
        f"(pid {worker.pid}) is alive and settles it: WORKER_LOST, or it runs again if "
        "acks_late"
    )
    with pytest.raises(TimeoutError, match=r"\(waiting: the process running it "):
        h.get(timeout=0.1)
    go.touch()
    assert blocker.get(timeout=20) == _pids_in(other)[0]
    assert h.get(timeout=80) == _pids_in(marker)[1] != child
    assert h.waiting_reason is None


def test_a_task_retried_on_another_queue_whose_worker_was_killed_names_that_queue(
    app: App, start_worker, tmp_path: Path, broker_kind: str
) -> None:
    """Sent to 'default', retried to 'second', whose only worker is killed whole: the
    task is settled once a worker of 'second' runs, and its handle says so, naming that
    queue alone. It named 'default' (its first queue) and the child's pid; then, on
    RabbitMQ, "'default' (or the one its retry named)"."""
    start_worker(concurrency=1)  # of 'default' alone: it cannot settle the task
    second = start_worker("-Q", "second", concurrency=1)
    marker = tmp_path / "marker"

    @app.task(bind=True, max_retries=1, acks_late=True)
    def retried_on_second(self: nbtask.Task, path: str) -> int:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.request.retries == 0:
            raise self.retry(countdown=0, queue="second")
        time.sleep(60.0)
        return os.getpid()

    h = retried_on_second.delay(str(marker))
    wait_until(lambda: len(_pids_in(marker)) == 2, 30, "the rerun to start")
    wait_until(lambda: h.info.get("pid") == _pids_in(marker)[1], 20, "its start to be seen")
    second.kill_whole()

    wait_until(lambda: "heartbeats" in (h.waiting_reason or ""), SAID_WITHIN, "the notice")
    host = h.info["worker"]
    settled = (
        "stopped sending heartbeats: it is settled once a worker of queue 'second' runs "
        "(nbtask worker -Q second); none is live now"
    )
    named = f"its worker (host {host}, pid {second.pid}) {settled}"
    # On RabbitMQ the dead worker's deliveries go back to their queues, and the worker of
    # 'default' may forget it at once: its process is named instead.
    unnamed = f"the worker of its process (host {host}, pid {h.info['pid']}) {settled}"
    said = h.waiting_reason
    assert said == named or (broker_kind == "amqp" and said == unnamed), said
    assert h.queue == "second" and h.state is State.STARTED
