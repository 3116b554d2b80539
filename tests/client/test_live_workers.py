"""The work a client sent to worker processes' own queues, until it ends; and how often
what became of a run whose process is gone is read.

Only what the client itself knows (no registry read): handles made here and ended with
the Future API, as the listener ends them when a final event arrives; and a store that
counts its reads.
"""

from __future__ import annotations

import gc
import time
from typing import cast

import pytest

from nbtask.brokers import Store
from nbtask.client.live_workers import REFRESH_SECONDS, LiveWorkers
from nbtask.core.handle import StartedBy, TaskHandle
from nbtask.core.holding import holder_queue
from nbtask.wire.events import State
from nbtask.wire.records import TaskRecord, WorkerInfo

HOLDER, OTHER = holder_queue("w1-0"), holder_queue("w2-0")


def live_workers() -> LiveWorkers:
    return LiveWorkers(cast(Store, None), "key")  # the store is not read for this


def test_work_sent_to_a_holder_counts_until_it_ends() -> None:
    live = live_workers()
    first, second = TaskHandle(None, "a", "t", HOLDER), TaskHandle(None, "b", "t", HOLDER)
    live.note_sent([first, second, TaskHandle(None, "c", "t", "default")])
    assert live.sent_to(HOLDER) and not live.sent_to(OTHER) and not live.sent_to("default")
    first.set_result(1)
    assert live.sent_to(HOLDER)  # the second still runs
    second.set_exception(RuntimeError("failed"))  # any final state ends it
    assert not live.sent_to(HOLDER)


def test_work_that_ended_out_of_order_still_counts_what_runs() -> None:
    live = live_workers()
    first, second = TaskHandle(None, "a", "t", HOLDER), TaskHandle(None, "b", "t", HOLDER)
    live.note_sent([first, second])
    second.set_result(2)
    assert live.sent_to(HOLDER)
    first.set_result(1)
    assert not live.sent_to(HOLDER)


def test_a_handle_the_notebook_let_go_is_not_kept_for_this() -> None:
    live = live_workers()
    live.note_sent([TaskHandle(None, "a", "t", HOLDER)])  # nothing else refers to it
    gc.collect()
    assert not live.sent_to(HOLDER)


class _Reads:
    """A store whose worker died with one of its processes: it counts the reads."""

    def __init__(self) -> None:
        self.records = 0
        self.dead = 0
        self.worker = WorkerInfo("host", 10, ("second",), 1, ("host-10-c0",), pids=(11,))

    def workers(self) -> dict[str, WorkerInfo]:
        return {}  # (its heartbeat lapsed)

    def get_record(self, task_id: str) -> TaskRecord:
        self.records += 1
        return TaskRecord(State.STARTED, worker="host", pid="11", consumer="host-10-c0")

    def dead_workers(self) -> dict[str, WorkerInfo | None]:
        self.dead += 1
        return {"host-10": self.worker}


def test_a_lost_run_asked_about_often_has_its_record_read_once_per_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A view asks what became of a run whose process is gone (ten times a second while a
    cell waits): the task's record and the dead workers' entries are read once, and again
    once the answer is older than the registry's snapshot may be. Before, both were read
    at every look."""
    reads = _Reads()
    live = LiveWorkers(cast(Store, reads), "key")
    run = StartedBy("t1", "host", 11, 100.0)
    said = "its worker (host host, pid 10) stopped sending heartbeats"
    answers = [live.lost_reason(run, "second") for _ in range(5)]
    assert all(a is not None and a.startswith(said) for a in answers)
    assert (reads.records, reads.dead) == (1, 1)
    # Another run is asked about on its own (this one's record names the first process).
    assert live.lost_reason(run._replace(pid=12), "second") is None
    assert (reads.records, reads.dead) == (2, 1)
    later = time.monotonic() + REFRESH_SECONDS + 1.0
    monkeypatch.setattr(time, "monotonic", lambda: later)  # the clock live_workers reads
    assert live.lost_reason(run, "second") == answers[0]
    assert (reads.records, reads.dead) == (3, 2)
