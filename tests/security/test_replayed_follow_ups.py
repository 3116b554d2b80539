"""What follows a task (its errbacks, its chain's later steps), against an outsider with
write access to the broker and the store but not the secret, who keeps a queued task's
genuine message and replays it later, or rewrites the plain fields of its record. A
worker sends a task's follow-ups only as its signed stored outcome owes them, once, and
never for a message older than ``max_age``: a replay (or a record's plain ``REVOKED``)
sends no errback and signs no outcome for a chain's later step. Both brokers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, TaskHandle
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers

#: The workers' max_age where a replay comes past it: long enough for a worker to start and
#: run the genuine message first, on a loaded machine too (6 s was not always).
MAX_AGE = 10.0


def _tasks(app: App) -> tuple[Any, Any]:
    """A step that notes its run, and an errback that notes its call."""

    @app.task
    def step(x: int, path: str) -> int:
        from tests.celery_tasks import record

        record(path, step=x)
        return x + 1

    @app.task
    def note(value: object, path: str) -> object:
        from tests.celery_tasks import record

        record(path, value=value)
        return value

    return step, note


def _log_count(worker: Any, text: str) -> int:
    return str(worker.log.read_text()).count(text)


def _chain(app: App, tmp_path: Path) -> tuple[TaskHandle, TaskHandle]:
    """``step(1) | step`` with an errback on the first step, sent with no worker up."""
    step, note = _tasks(app)
    ledger, calls = str(tmp_path / "ledger"), str(tmp_path / "calls")
    last = (step.s(1, ledger).set(link_error=note.s(calls)) | step.s(ledger)).delay()
    head = last.parent
    assert head is not None
    return head, last


def _forget(access: RawBroker, *task_ids: str) -> None:
    """Delete what remembers that the tasks ran: their records and ended-task entries."""
    for task_id in task_ids:
        access.store.delete(access.keys.record_key(task_id))
        access.store.zrem(access.keys.done_key, task_id)


def _nothing_followed(app: App, tmp_path: Path) -> None:
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert read_records(tmp_path / "calls") == [], "an errback ran"


def test_a_message_replayed_past_max_age_sends_no_errback_and_ends_no_later_step(
    app: App, access: RawBroker, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain ran and succeeded; past ``max_age`` its first step's message is replayed
    with the records and ended-task entries deleted: refused as too old, and nothing it
    carries is acted on (no errback for a task that succeeded, no FAILURE signed for its
    later step, which also succeeded)."""
    monkeypatch.setenv("NBTASK_MAX_AGE", str(MAX_AGE))  # for the workers (start_worker copies it)
    sent = time.time()
    head, last = _chain(app, tmp_path)
    raw = access.captured()
    worker = start_worker(concurrency=1)
    assert last.get(timeout=20) == 3
    wait_until(lambda: time.time() > sent + MAX_AGE + 0.5, 20, "max_age to pass since it was sent")
    _forget(access, head.id, last.id)
    access.inject(raw, task_id=head.id)
    wait_until(lambda: _log_count(worker, "older than max_age") == 1, 20, "the replay refused")
    access.inject(raw)  # again: the refusal's record drops it
    dropped = f"dropped a message for task {head.id}"
    wait_until(lambda: _log_count(worker, dropped) == 1, 20, "the second replay dropped")
    _nothing_followed(app, tmp_path)
    assert access.record(last.id) == {}, "an outcome was stored for the later step"
    assert [r["step"] for r in read_records(tmp_path / "ledger")] == [1, 2]


def test_a_message_replayed_once_its_task_is_forgotten_sends_no_errback(
    app: App, access: RawBroker, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No store write at all: once ``result_ttl`` has let the record and the ended-task
    entry go, one plain replay of the message is refused as too old, and sends nothing."""
    monkeypatch.setenv("NBTASK_RESULT_TTL", str(MAX_AGE + 2))
    monkeypatch.setenv("NBTASK_MAX_AGE", str(MAX_AGE))
    step, note = _tasks(app)
    calls = str(tmp_path / "calls")
    h = step.apply_async((1, str(tmp_path / "ledger")), link_error=note.s(calls))
    raw = access.captured()
    worker = start_worker(concurrency=1)
    assert h.get(timeout=20) == 2
    record = access.keys.record_key(h.id)

    def forgotten() -> bool:
        gone = not access.store.exists(record)
        return gone and access.store.zscore(access.keys.done_key, h.id) is None

    wait_until(forgotten, 30, "the record and the ended-task entry to expire")
    access.inject(raw)
    wait_until(lambda: _log_count(worker, "older than max_age") == 1, 20, "the replay refused")
    _nothing_followed(app, tmp_path)
    assert [r["step"] for r in read_records(tmp_path / "ledger")] == [1]


def test_a_record_whose_plain_state_says_revoked_sends_no_errback_and_ends_no_later_step(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """One plain field (``state REVOKED``) on a queued task's record: the task is not run,
    but with no signed REVOKED outcome in the record the worker neither sends its errbacks
    nor signs REVOKED for its chain's later step."""
    head, last = _chain(app, tmp_path)
    access.captured()
    access.store.hset(access.keys.record_key(head.id), "state", "REVOKED")
    worker = start_worker(concurrency=1)
    wait_until(lambda: _log_count(worker, f"dropped a message for task {head.id}") == 1, 20, "drop")
    _nothing_followed(app, tmp_path)
    assert "without a signed outcome owing its follow-ups" in worker.log.read_text()
    assert access.record(last.id) == {}, "an outcome was stored for the later step"
    assert not last.done()
    assert read_records(tmp_path / "ledger") == []


def test_a_revoked_tasks_replayed_message_sends_its_errback_once(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """A task revoked while queued: the worker that drops its message sends its errback and
    ends its chain's later step, once; replays of the message (no store write) find them
    taken and send nothing."""
    head, last = _chain(app, tmp_path)  # its errback has no id of its own: each send runs
    ledger, calls = tmp_path / "ledger", tmp_path / "calls"
    raw = access.captured()
    assert app.revoke(head.id)
    worker = start_worker(concurrency=1)
    wait_until(lambda: bool(read_records(calls)), 20, "the errback to run")
    with pytest.raises(nbtask.TaskRevoked, match=head.id):
        last.get(timeout=20)
    access.inject(raw, task_id=head.id)
    access.inject(raw)  # and without the id beside it
    dropped = f"dropped a message for task {head.id}"
    wait_until(lambda: _log_count(worker, dropped) == 3, 20, "the replays dropped")
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert [r["value"] for r in read_records(calls)] == [head.id]
    assert read_records(ledger) == []


def test_a_message_made_to_look_lost_past_max_age_sends_no_errback_and_ends_no_later_step(
    app: App,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same replay past ``max_age``, made to look like a dead holder's delivery so that
    a supervisor settles it (a lost task is reported and followed up): the supervisor
    neither reports it lost nor sends anything it carries."""
    monkeypatch.setenv("NBTASK_MAX_AGE", str(MAX_AGE))
    sent = time.time()
    head, last = _chain(app, tmp_path)
    raw = access.captured()
    worker = start_worker(concurrency=1)
    assert last.get(timeout=20) == 3
    wait_until(lambda: time.time() > sent + MAX_AGE + 0.5, 20, "max_age to pass since it was sent")
    _forget(access, head.id, last.id)
    access.inject_lost(raw, head.id)
    wait_until(
        lambda: access.drained() and not access.store.zcard(f"{access.settings.key_prefix}:lost"),
        30,
        "the copy settled",
    )
    _nothing_followed(app, tmp_path)
    assert access.record(last.id) == {}, "an outcome was stored for the later step"
    assert b"WORKER_LOST" not in access.record(head.id).get(b"state", b"")
    assert "older than max_age" in worker.log.read_text()


@pytest.mark.parametrize("fails", [False, True], ids=["link", "link_error"])
def test_follow_ups_marked_owed_again_and_replayed_are_sent_once(
    app: App, access: RawBroker, start_worker, tmp_path: Path, fails: bool
) -> None:
    """A link or errback has a task id of its own, fixed in the signed message: marking its
    task's follow-ups owed again (one plain field) and replaying the task's message makes
    the worker send it again, and the copy finds that task run already: it runs once."""
    step, note = _tasks(app)
    calls = str(tmp_path / "calls")

    @app.task
    def broken(path: str) -> None:
        raise ValueError("broken")

    h = (
        broken.apply_async((str(tmp_path / "ledger"),), link_error=note.s(calls))
        if fails
        else step.apply_async((1, str(tmp_path / "ledger")), link=note.s(calls))
    )
    raw = access.captured()
    worker = start_worker(concurrency=1)
    wait_until(lambda: bool(read_records(calls)), 20, "the follow-up to run")
    for _ in range(2):
        access.store.hset(access.keys.record_key(h.id), "follow_ups", "owed")
        access.inject(raw, task_id=h.id)
    dropped = f"dropped a message for task {h.id}"
    wait_until(lambda: _log_count(worker, dropped) == 2, 20, "the replays dropped")
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert [r["value"] for r in read_records(calls)] == [h.id if fails else 2]
