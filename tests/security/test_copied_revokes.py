"""A client's signed revoke kept in a task's record (``revoked``: the task's plain state
said it had started when it was revoked), against an outsider with write access to the
broker and the store but not the secret. A genuine revoke copied from another task's
record into this one's names that other task: it does not revoke this one, which runs
(or fails) as if it were not there, and the task it names stays revoked. A revoke naming
this task but not signed with the secret is deleted by its worker, which runs the task.
Both brokers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import RECORD_ID, ledger_runs
from raw_broker import RawBroker

import nbtask
from nbtask import App
from nbtask.wire.envelope import Signer
from nbtask.wire.events import FINAL_SEQ, Event, EventType

pytestmark = pytest.mark.brokers


def test_a_revoke_copied_from_another_tasks_record_does_not_revoke_nor_hang_this_task(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """Before, the start check took any ``revoked`` field for this task's revoke: it stored
    the other task's revoke event as this task's outcome, marked it ended and dropped its
    message; its client, which found no outcome of its own, waited for ever
    (``get()`` timed out)."""
    ledger = tmp_path / "ledger"
    revoked = app.send_task(RECORD_ID, (str(ledger),))
    victim = app.send_task(RECORD_ID, (str(ledger),))
    app.flush()
    # A genuine signed revoke, kept in the revoked task's record (its plain state said it
    # had started), copied by the outsider into the victim's record.
    access.store.hset(access.keys.record_key(revoked.id), "state", "STARTED")
    assert app.revoke(revoked.id) is False
    access.store.hset(access.keys.record_key(revoked.id), "state", "PENDING")
    signed = access.record(revoked.id)[b"revoked"]
    access.store.hset(access.keys.record_key(victim.id), "revoked", signed)

    start_worker(concurrency=1)
    assert victim.get(timeout=60) == victim.id
    assert ledger_runs(ledger) == {victim.id: 1}, "the revoked task ran, or the victim twice"
    with pytest.raises(nbtask.TaskRevoked, match=revoked.id):
        revoked.get(timeout=30)
    assert app.handle(victim.id).get(timeout=10) == victim.id


def test_a_forged_revoke_in_this_tasks_record_is_deleted_and_the_task_runs(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """Before, the start check (Lua, which cannot check a signature) took a revoke naming
    this task whatever its signature: it stored it as the task's outcome and dropped its
    message; its client refused the unsigned revoke and waited for ever (``get()`` timed
    out, the task PENDING)."""
    ledger = tmp_path / "ledger"
    victim = app.send_task(RECORD_ID, (str(ledger),))
    app.flush()
    run = (app.settings.key_prefix, float(access.record(victim.id)[b"sent"]))
    forged = Event(EventType.REVOKED, victim.id, FINAL_SEQ, {"reason": "revoked"}, run=run)
    raw = Signer("not-the-secret").seal(forged.to_header())
    access.store.hset(access.keys.record_key(victim.id), "revoked", raw)

    worker = start_worker(concurrency=1)
    assert victim.get(timeout=60) == victim.id
    assert ledger_runs(ledger) == {victim.id: 1}
    assert b"revoked" not in access.record(victim.id), "the forged revoke was kept"
    assert f"deleted a revoke kept in task {victim.id}'s record" in worker.log.read_text()


def test_a_forged_revoke_too_large_to_check_is_deleted_and_the_task_runs(
    app: App, access: RawBroker, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a revoke larger than the worker reads (its ``max_message_bytes``) could not
    be checked: it was handed back three times, then the task failed unrun ("the revoke
    kept in the record ... kept changing", which it did not) and its message was
    dead-lettered. A revoke larger than nbtask writes is forged, whatever the limit."""
    monkeypatch.setenv("NBTASK_MAX_MESSAGE_BYTES", str(64 * 1024))  # the worker's alone
    ledger = tmp_path / "ledger"
    victim = app.send_task(RECORD_ID, (str(ledger),))
    app.flush()
    run = (app.settings.key_prefix, float(access.record(victim.id)[b"sent"]))
    padded = {"reason": "revoked" + " " * (100 * 1024)}  # over the worker's limit
    forged = Event(EventType.REVOKED, victim.id, FINAL_SEQ, padded, run=run)
    raw = Signer("not-the-secret").seal(forged.to_header())
    access.store.hset(access.keys.record_key(victim.id), "revoked", raw)

    worker = start_worker(concurrency=1)
    assert victim.get(timeout=60) == victim.id
    assert ledger_runs(ledger) == {victim.id: 1}
    assert b"revoked" not in access.record(victim.id), "the forged revoke was kept"
    said = worker.log.read_text()
    assert f"deleted a revoke kept in task {victim.id}'s record" in said
    assert "kept changing" not in said
