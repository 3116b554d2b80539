"""Messages of 1 MiB and more take another path on Redis (no copy through a script): it
must keep every rule of the small path. Both brokers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_for_housekeeping, wait_until

import nbtask
from nbtask import App, ConfigurationError, State

pytestmark = pytest.mark.brokers

BIG = 2 * 1024 * 1024  # over the 1 MiB from which Redis messages skip the script
MARK_SIZE = "tests.sample_tasks.mark_size"


def _ledger(path: Path) -> list[int]:
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def test_revoked_chain_step_stays_revoked_when_its_large_message_is_sent(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Revoke a chain's next step before the worker sends it with a large input: the
    revoke wins, the step never runs."""
    start_worker()
    go, ledger = tmp_path / "go", tmp_path / "ledger"

    @app.task
    def big_after_file(go: str, size: int) -> bytes:
        import time

        deadline = time.monotonic() + 15
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return b"x" * size

    @app.task
    def mark_size(data: bytes, path: str) -> int:
        with open(path, "a") as f:
            f.write(f"{len(data)}\n")
        return len(data)

    last = (big_after_file.s(str(go), BIG) | mark_size.s(str(ledger))).delay()
    assert app.revoke(last.id) is True
    go.touch()
    assert last.parent is not None
    assert len(last.parent.get(timeout=20)) == BIG
    with pytest.raises(nbtask.TaskRevoked):
        last.get(timeout=10)
    wait_for_housekeeping(app)
    assert _ledger(ledger) == [], "the revoked step ran"
    assert app.store.get_record(last.id).state is State.REVOKED


def test_large_message_for_a_revoked_id_is_refused_and_never_runs(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker()
    ledger = tmp_path / "ledger"
    task_id = "revoked-before-sent"
    assert app.revoke(task_id) is True  # unknown yet: marked REVOKED for when it comes
    with pytest.raises(ConfigurationError, match="REVOKED"):
        app.send_task(MARK_SIZE, (b"y" * BIG, str(ledger)), task_id=task_id)
    small = app.send_task(MARK_SIZE, (b"z", str(ledger)))
    assert small.get(timeout=10) == 1
    wait_for_housekeeping(app)
    assert _ledger(ledger) == [1]
    assert app.store.get_record(task_id).state is State.REVOKED


def test_large_arguments_and_results_round_trip(app: App, start_worker, tmp_path: Path) -> None:
    start_worker()
    ledger = tmp_path / "ledger"
    handles = [app.send_task(MARK_SIZE, (b"a" * BIG, str(ledger))) for _ in range(3)]
    assert [h.get(timeout=20) for h in handles] == [BIG] * 3
    wait_until(lambda: len(_ledger(ledger)) == 3, 5, "three runs")
