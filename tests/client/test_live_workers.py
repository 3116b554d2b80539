"""The work a client sent to worker processes' own queues, until it ends; and how often
what became of a run whose process is gone is read.

Only what the client itself knows (no registry read): handles made here and ended with
the Future API, as the listener ends them when a final event arrives; and a store that
counts its reads.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import subprocess
import time
from typing import cast

import pytest

from nbtask.brokers import Store
from nbtask.client.live_workers import LATE_SECONDS, REFRESH_SECONDS, LiveWorkers
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


class _Clock:
    """``time.monotonic`` as live_workers reads it, moved on by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: self.now)


def test_a_lost_run_asked_about_often_has_its_record_read_once_per_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A view asks what became of a run whose process is gone (ten times a second while a
    cell waits): the task's record and the dead workers' entries are read once, and again
    once the answer is older than the registry's snapshot may be. Before, both were read
    at every look."""
    clock = _Clock(monkeypatch)
    reads = _Reads()
    live = LiveWorkers(cast(Store, reads), "key")
    live.lost_reason(StartedBy("t0", "host", 11, 100.0), "second")  # the lapse is seen
    clock.now += LATE_SECONDS + REFRESH_SECONDS + 1.0
    reads.records = reads.dead = 0
    run = StartedBy("t1", "host", 11, 100.0)
    said = "its worker (host host, pid 10) stopped sending heartbeats"
    answers = [live.lost_reason(run, "second") for _ in range(5)]
    assert all(a is not None and a.startswith(said) for a in answers)
    assert (reads.records, reads.dead) == (1, 1)
    # Another run is asked about on its own (this one's record names the first process).
    assert live.lost_reason(run._replace(pid=12), "second") is None
    assert (reads.records, reads.dead) == (2, 1)
    clock.now += REFRESH_SECONDS + 1.0
    assert live.lost_reason(run, "second") == answers[0]
    assert (reads.records, reads.dead) == (3, 2)


def test_a_worker_of_another_host_whose_heartbeat_lapsed_is_late_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its process cannot be looked at from here: for LATE_SECONDS after this client first
    found its heartbeat lapsed, neither its queue nor the run of its process is said to
    lack a live worker (a pause, not a death, as far as can be told); then both are.
    Before, both were said at the first look."""
    clock = _Clock(monkeypatch)
    live = LiveWorkers(cast(Store, _Reads()), "key")
    run = StartedBy("t1", "host", 11, 100.0)
    assert (live.waiting_reason("second"), live.lost_reason(run, "second")) == (None, None)
    clock.now += LATE_SECONDS - 0.5
    assert (live.waiting_reason("second"), live.lost_reason(run, "second")) == (None, None)
    clock.now += 1.0
    assert live.waiting_reason("second") == "no live worker consumes queue 'second'"
    clock.now += REFRESH_SECONDS  # what was said of the run is said again until then
    assert "stopped sending heartbeats" in (live.lost_reason(run, "second") or "")


def test_a_worker_of_this_host_whose_heartbeat_lapsed_is_late_while_its_process_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its process is looked at: this one (it runs) is late, not gone; a pid that runs no
    process here is gone at the first look, with no wait."""
    _Clock(monkeypatch)
    here = socket.gethostname()
    reads = _Reads()
    reads.worker = dataclasses.replace(reads.worker, hostname=here, pid=os.getpid())
    assert LiveWorkers(cast(Store, reads), "key").waiting_reason("second") is None
    gone = _free_pid()
    reads.worker = dataclasses.replace(reads.worker, hostname=here, pid=gone)
    said = LiveWorkers(cast(Store, reads), "key").waiting_reason("second")
    assert said == "no live worker consumes queue 'second'"


def _free_pid() -> int:
    """A pid no process has now (one that just ended, reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


class _Beats(_Reads):
    """The same worker of another host, live again whenever ``live`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.live = False

    def workers(self) -> dict[str, WorkerInfo]:
        return {"host-10": self.worker} if self.live else {}

    def dead_workers(self) -> dict[str, WorkerInfo | None]:
        return {} if self.live else {"host-10": self.worker}


def test_a_worker_of_another_host_that_lapses_again_is_late_again_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its heartbeat lapsed once (and it was said gone past LATE_SECONDS), then it beat
    again for a long while, and lapsed again: a new pause, given LATE_SECONDS again, even
    where nothing asked while it was live. Before, the first lapse was taken for this
    one's start: it was said gone at once."""
    clock = _Clock(monkeypatch)
    beats = _Beats()
    live = LiveWorkers(cast(Store, beats), "key")
    assert live.waiting_reason("second") is None  # its first lapse is seen
    clock.now += LATE_SECONDS + REFRESH_SECONDS + 1.0
    assert live.waiting_reason("second") == "no live worker consumes queue 'second'"
    beats.live = True  # it beats again (its entry says when: seen)
    beats.worker = dataclasses.replace(beats.worker, seen=beats.worker.seen + 600.0)
    clock.now += 600.0
    beats.live = False  # and lapses again
    assert live.waiting_reason("second") is None


def test_a_worker_of_another_host_that_said_it_stopped_is_not_late() -> None:
    """A worker stopping while a queue of its is still consumed leaves its entry, its
    pid 0 (stopped, not paused), and ends its heartbeat: its queue is said to lack a live
    worker at once, as one of this host's is. Before, it was taken for late for
    LATE_SECONDS."""
    reads = _Reads()
    reads.worker = dataclasses.replace(reads.worker, pid=0)
    live = LiveWorkers(cast(Store, reads), "key")
    assert live.waiting_reason("second") == "no live worker consumes queue 'second'"
