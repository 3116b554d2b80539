"""A client whose clock is ahead of the workers': its messages would stay young enough to
run (``max_age``, counted from their signed ``created``) longer than the workers remember
that they ran, so a replay could run one again. Workers refuse them. Both brokers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import RECORD_ID, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App
from nbtask.core import outgoing

pytestmark = pytest.mark.brokers

AHEAD = 3600.0


class _ClockAhead:
    """The ``time`` module as a client whose clock is an hour ahead sees it."""

    @staticmethod
    def time() -> float:
        return time.time() + AHEAD


def test_a_message_created_far_in_the_workers_future_is_refused(
    app: App,
    access: RawBroker,
    start_worker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the default max_age (a day) such a message was valid a day and an hour after
    it was sent, an hour after the ended-task memory and its record let it go: a replay
    then ran it again. Now it is dead-lettered, and its client told why."""
    ledger = tmp_path / "ledger"
    monkeypatch.setattr(outgoing, "time", _ClockAhead)
    h = app.send_task(RECORD_ID, (str(ledger),))
    monkeypatch.undo()
    worker = start_worker(concurrency=1)
    with pytest.raises(nbtask.NbtaskError, match="in this worker's future"):
        value = h.get(timeout=15)
        pytest.fail(f"a message created {AHEAD:.0f} s ahead ran: {value}")
    assert not ledger.exists()
    # Dead-lettered once its outcome is stored and followed up (its client may hear first).
    wait_until(lambda: len(access.dead_letters()) == 1, 10, "the message to be dead-lettered")
    log = worker.log.read_text()
    assert log.count(f"rejected task {h.id}: the message was created 3") == 1, log
    # A client a few seconds ahead, as clocks often are, still has its tasks run.
    monkeypatch.setattr(outgoing, "time", _ClockAhead)
    monkeypatch.setattr(_ClockAhead, "time", staticmethod(lambda: time.time() + 5.0))
    assert app.send_task(RECORD_ID, (str(ledger),)).get(timeout=15)
    assert len(ledger.read_text().split()) == 1
