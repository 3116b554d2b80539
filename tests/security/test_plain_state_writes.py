"""A task's record's plain ``state`` field, against an outsider with write access to the
broker and the store but not the secret. Written while a task runs (``WORKER_LOST``), then
reset to ``PENDING`` with a copy of the genuine message put back: the task's outcome is
stored and sent all the same, and the copy is dropped. Written while a task waits
(``STARTED``) as its client revokes it with ``terminate=True``, then reset to ``PENDING``:
the task never runs. Only signed facts (a stored signed outcome, the ended-task set, a
revoke's signed event) say that a task ended or may not start. Both brokers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import RECORD_ID, ledger_runs, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

import nbtask
from nbtask import App

pytestmark = pytest.mark.brokers

WAIT = "tests.sample_tasks.wait_for_file"


def _log_count(worker: WorkerProcess, text: str) -> int:
    return worker.log.read_text().count(text)


def _state(access: RawBroker, task_id: str) -> bytes:
    return access.record(task_id).get(b"state", b"")


def test_a_plain_worker_lost_state_keeps_no_outcome_from_being_stored_nor_lets_a_replay_run(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """Before, the task's end was refused by the plain ``WORKER_LOST`` alone: no outcome
    stored (on Redis none sent either: ``get()`` waited for ever), no ended-task entry, so
    once the state was reset to ``PENDING`` a copy of its message ran it again."""
    marker, go = tmp_path / "marker", tmp_path / "go"
    h = app.send_task(WAIT, (str(marker), str(go)))
    raw = access.captured()
    worker = start_worker(concurrency=1)
    wait_until(lambda: _state(access, h.id) == b"STARTED", 20, "the task to start")
    access.store.hset(access.keys.record_key(h.id), "state", "WORKER_LOST")
    go.touch()
    pid = h.get(timeout=20)
    assert marker.read_text().split() == [str(pid)]
    record = access.record(h.id)
    assert record[b"state"] == b"SUCCESS" and record.get(b"result"), record.keys()
    assert access.store.zscore(access.keys.done_key, h.id) is not None
    said = "over a record whose plain state said WORKER_LOST with no signed outcome"
    wait_until(lambda: _log_count(worker, said) == 1, 20, "the plain state said in the log")
    assert app.handle(h.id).get(timeout=10) == pid  # a re-attached handle finds it too
    access.store.hset(access.keys.record_key(h.id), "state", "PENDING")
    access.inject(raw, task_id=h.id)
    access.inject(raw)  # and without the id beside it
    dropped = f"dropped a message for task {h.id}"
    wait_until(lambda: _log_count(worker, dropped) == 2, 20, "the replays dropped")
    assert marker.read_text().split() == [str(pid)], "the task ran again"
    assert _log_count(worker, said) == 1
    assert "after it had been reported lost" not in worker.log.read_text()


@pytest.mark.parametrize("terminate", [True, False], ids=["terminate", "plain"])
def test_a_queued_task_revoked_while_its_plain_state_says_started_never_runs(
    app: App, access: RawBroker, start_worker, tmp_path: Path, terminate: bool
) -> None:
    """Before, the revoke took the plain ``STARTED`` at its word: with ``terminate`` it
    sent a terminate request no process acted on and returned True, without it returned
    False; nothing signed said the task was revoked, and once the state was reset to
    ``PENDING`` the task ran and succeeded."""
    ledger = tmp_path / "ledger"
    h = app.send_task(RECORD_ID, (str(ledger),))
    access.captured()
    record = access.keys.record_key(h.id)
    access.store.hset(record, "state", "STARTED")
    assert app.revoke(h.id, terminate=terminate) is terminate
    access.store.hset(record, "state", "PENDING")
    worker = start_worker(concurrency=1)
    with pytest.raises(nbtask.TaskRevoked, match=h.id):
        h.get(timeout=20)
    with pytest.raises(nbtask.TaskRevoked, match=h.id):
        app.handle(h.id).get(timeout=10)
    dropped = f"dropped a message for task {h.id}: it is already REVOKED"
    wait_until(lambda: _log_count(worker, dropped) == 1, 20, "the message dropped")
    assert _state(access, h.id) == b"REVOKED"
    assert access.store.zscore(access.keys.done_key, h.id) is not None
    assert ledger_runs(ledger) == {}, "the revoked task ran"
