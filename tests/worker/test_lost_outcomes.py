"""A worker child that dies after its task returned but before the outcome was stored,
and acks_late without reject_on_worker_lost: the rows of the README's delivery table
that need their own setup. Both brokers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, State

pytestmark = pytest.mark.brokers


def lines_in(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_child_killed_after_the_task_returned(
    app: App, start_worker, tmp_path: Path, access: RawBroker, acks_late: bool
) -> None:
    start_worker(concurrency=1)
    ledger, hold = tmp_path / "ledger", tmp_path / "hold"

    class SlowToPickle:
        """A result whose pickling blocks: the child is then past ``run`` but has stored nothing."""

        def __init__(self, hold: str) -> None:
            self.hold = hold

        def __reduce__(self) -> tuple[object, ...]:
            import os
            import time

            if not os.path.exists(self.hold):  # the first run waits here to be killed
                with open(self.hold, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(60)
            return (str, ("done",))

    @app.task(acks_late=acks_late)
    def returns_slowly(ledger: str, hold: str) -> SlowToPickle:
        import os

        with open(ledger, "a") as f:
            f.write(f"{os.getpid()}\n")
        return SlowToPickle(hold)

    h = returns_slowly.delay(str(ledger), str(hold))
    # Its pid is in the file once written whole (the file appears before its contents).
    wait_until(lambda: hold.exists() and hold.read_text().strip(), 15, "the task to have returned")
    os.kill(int(hold.read_text()), signal.SIGKILL)
    if acks_late:  # it runs again: the reason acks_late tasks must be idempotent
        assert h.get(timeout=20) == "done"
        assert len(lines_in(ledger)) == 2
    else:  # it did run; its outcome is lost, and said so
        with pytest.raises(nbtask.WorkerLost):
            h.get(timeout=20)
        assert h.state is State.WORKER_LOST
        assert len(lines_in(ledger)) == 1
    wait_until(access.drained, 10, "the message to be settled")


def test_acks_late_without_reject_on_worker_lost_reports_worker_lost(
    app: App, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    worker = start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task(acks_late=True, reject_on_worker_lost=False)
    def killed_once(path: str) -> None:
        import os
        import time

        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(60)

    h = killed_once.delay(str(ledger))
    wait_until(lambda: len(lines_in(ledger)) == 1, 15, "the task to start")
    os.kill(int(lines_in(ledger)[0]), signal.SIGKILL)
    with pytest.raises(nbtask.WorkerLost):
        h.get(timeout=20)
    # A redelivery would come after the outcome: give one the time to show (each wait
    # sees a whole housekeeping round begun after the last), then look.
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert access.drained()
    assert len(lines_in(ledger)) == 1  # not run again
    assert h.state is State.WORKER_LOST
    assert h.failed() and not h.successful()  # Celery's WorkerLostError is a FAILURE
    assert worker.process.poll() is None
