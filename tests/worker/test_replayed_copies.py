"""Replays of a task's earlier message once a later one was put back (a retry, a
``Reject(requeue=True)``), by someone with broker access but not the secret: the earlier
copy ran already, so it is dropped as a duplicate, and the copy put back runs and ends
the task. Both brokers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_until
from raw_broker import RawBroker

from nbtask import App

pytestmark = pytest.mark.brokers

SUPERSEDED = "that ran before a later one was put back (a duplicate)"


def _log_count(worker: object, text: str) -> int:
    return str(worker.log.read_text()).count(text)  # type: ignore[attr-defined]


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_first_message_replayed_while_its_retry_waits_is_dropped_and_the_retry_ends_it(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """No store write: the copy taken as the task was sent, put back while its record
    says RETRY, used to run once more and stay STARTED, so the genuine retry was refused
    and the client waited for ever."""
    ledger = tmp_path / "ledger"

    @app.task(bind=True, max_retries=1, default_retry_delay=3)
    def retried_once(self, path: str) -> int:
        with open(path, "a") as f:
            f.write(f"{self.request.retries}\n")
        if self.request.retries < 1:
            raise self.retry(exc=ValueError("once more"))
        return int(self.request.retries)

    h = retried_once.delay(str(ledger))
    raw = access.captured()
    worker = start_worker(concurrency=1)
    wait_until(lambda: access.record(h.id).get(b"state") == b"RETRY", 15, "the retry")
    access.inject(raw, task_id=h.id)
    wait_until(lambda: _log_count(worker, SUPERSEDED) or len(_lines(ledger)) > 1, 15, "a drop")
    assert h.get(timeout=20) == 1
    assert _lines(ledger) == ["0", "1"]
    assert _log_count(worker, f"dropped a message for task {h.id}") == 1
    assert _log_count(worker, SUPERSEDED) == 1


def test_a_message_replayed_after_a_reject_put_it_back_is_dropped(
    app: App, access: RawBroker, start_worker, tmp_path: Path
) -> None:
    """The same for the copy a ``Reject(requeue=True)`` puts back (due 1 s on)."""
    ledger = tmp_path / "ledger"

    @app.task(acks_late=True)
    def rejected_once(path: str) -> int:
        from nbtask import Reject

        with open(path, "a") as f:
            f.write("run\n")
        with open(path) as f:
            runs = len(f.read().split())
        if runs == 1:
            raise Reject("not yet", requeue=True)
        return runs

    h = rejected_once.delay(str(ledger))
    raw = access.captured()
    worker = start_worker(concurrency=1)
    wait_until(lambda: _log_count(worker, "put back on its queue"), 15, "the reject")
    access.inject(raw, task_id=h.id)
    assert h.get(timeout=20) == 2
    wait_until(lambda: _log_count(worker, f"dropped a message for task {h.id}"), 10, "a drop")
    assert _log_count(worker, SUPERSEDED) == 1, worker.log.read_text()  # type: ignore[attr-defined]
    assert _lines(ledger) == ["run", "run"]
