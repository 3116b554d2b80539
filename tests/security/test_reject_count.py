"""How many times ``Reject(requeue=True)`` put a task back, against an outsider with write
access to the broker but not the secret. The count travels in the message, signed by the
worker that put it back: what is written in the task's journal (its unsigned list of log
lines in the store) neither resets it, nor raises it, nor costs the worker a read. Both
brokers (the message is parked in the store and comes back on the broker's queue)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App, Reject, State
from nbtask.worker.predicates import REQUEUED
from tests.predicate_tasks import notes

pytestmark = pytest.mark.brokers

TASKS = "tests.predicate_tasks"


def test_a_journal_of_another_type_does_not_make_a_rejecting_task_loop(
    app: App,
    access: RawBroker,
    start_worker: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NBTASK_MAX_REDELIVERIES", "1")  # for the worker
    path = tmp_path / "always"
    h = app.send_task(f"{TASKS}.rejects_always", (str(path),))
    journal = access.keys.journal_key(h.id)
    access.store.set(journal, "not a list")  # before any worker runs it
    start_worker("-A", TASKS)
    with pytest.raises(Reject, match="never"):
        h.get(timeout=20)
    assert h.state is State.FAILURE
    assert notes(path) == ["run", "run"]  # put back once (max_redeliveries=1), then failed
    assert access.store.get(journal) == b"not a list"  # still there: it changed nothing


def test_lines_pushed_into_the_journal_do_not_fail_a_task_early(
    app: App,
    access: RawBroker,
    start_worker: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NBTASK_MAX_REDELIVERIES", "2")  # for the worker
    path = tmp_path / "once"
    h = app.send_task(f"{TASKS}.rejects_once", (str(path),), acks_late=True)
    forged = [f"WARNING task {TASKS}.rejects_once[{h.id}] {REQUEUED} (not yet)"] * 5
    access.store.rpush(access.keys.journal_key(h.id), *forged)
    start_worker("-A", TASKS)
    assert h.get(timeout=20) == 2  # rejected once, then ran again and returned
    wait_until(lambda: "after_return" in notes(path), 10, "the returning run's handler")
    assert notes(path) == ["run", "run", "after_return"]


def _peak_rss(processes: list[psutil.Process]) -> int:
    """The largest peak resident size (VmHWM, bytes) among ``processes``."""
    peaks = []
    for process in processes:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) * 1024)
    return max(peaks)


def test_a_planted_journal_is_not_read_when_a_task_rejects(
    app: App,
    access: RawBroker,
    start_worker: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 MiB planted in the journal: a worker process that read it would hold it several
    times over (the reply, its text, the printable copy)."""
    monkeypatch.setenv("NBTASK_MAX_REDELIVERIES", "1")  # for the worker
    planted = 64 * 2**20
    path = tmp_path / "always"
    h = app.send_task(f"{TASKS}.rejects_always", (str(path),))
    entry = b"x" * (planted // 128)
    access.store.rpush(access.keys.journal_key(h.id), *[entry] * 128)
    worker = start_worker("-A", TASKS, concurrency=1)
    before = _peak_rss(worker.children())
    with pytest.raises(Reject, match="never"):
        h.get(timeout=60)
    assert notes(path) == ["run", "run"]
    grown = _peak_rss(worker.children()) - before
    assert grown < planted // 2, f"a worker process grew by {grown >> 20} MiB"
