"""Revoke and cancel: queued tasks never start, running ones are
interrupted then killed, and no revoked task runs anyway, even under load."""

from __future__ import annotations

import concurrent.futures
import signal
from collections import Counter
from pathlib import Path

import psutil
import pytest
import redis
from helpers import wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, Event, State
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers

SLOW_HANDLER = "tests.celery_tasks.slow_handler"
MARK = "tests.celery_tasks.mark"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"
IMPORT_THEN_WAIT = "tests.sample_tasks.import_then_wait"

# A package like pandas: what it registers while imported stays registered, so importing
# it again after an import cut in half fails.
SLOW_PACKAGE = {
    "registry.py": (
        "NAMES = set()\n"
        "def add(name):\n"
        "    if name in NAMES:\n"
        "        raise RuntimeError(f'{name} has already been registered')\n"
        "    NAMES.add(name)\n"
    ),
    "__init__.py": (
        "import os, pathlib, time\n"
        "from slowpkg import registry\n"
        "registry.add('option')\n"
        "pathlib.Path(MARKER).write_text(str(os.getpid()))\n"
        "time.sleep(2)\n"
    ),
}


def _busy(app: App, task_id: str) -> bool:
    """True once a worker's heartbeat lists ``task_id`` among its running tasks."""
    return any(task_id in info.busy for info in app.workers().values())


def _warm_up(app: App, tmp_path: Path) -> None:
    """Return once the supervisor has gone round its loop with a task running."""
    marker, go = tmp_path / "warm-marker", tmp_path / "warm-go"
    h = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(lambda: _busy(app, h.id), 10, "the warm-up task to show as busy")
    go.touch()
    h.get(timeout=10)


def _drained(r: redis.Redis, prefix: str, access: RawBroker) -> bool:
    return access.drained() and r.zcard(f"{prefix}:eta:default") == 0


def test_revoke_queued_and_eta_tasks_they_never_run(
    app: App, start_worker, prefix: str, r: redis.Redis, access: RawBroker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"

    @app.task
    def marker(path: str, label: str) -> str:
        from tests.celery_tasks import record

        record(path, label=label)
        return label

    queued = marker.delay(str(ledger), "queued")
    later = marker.apply_async((str(ledger), "later"), countdown=1.0)
    kept = marker.delay(str(ledger), "kept")
    assert app.revoke(queued.id) is True
    assert app.revoke(later.id) is True
    for h in (queued, later):
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=5)
        assert h.state is State.REVOKED

    start_worker()
    assert kept.get(timeout=10) == "kept"
    wait_until(lambda: _drained(r, prefix, access), 10, "the revoked messages to be dropped")
    assert [rec["label"] for rec in read_records(ledger)] == ["kept"]
    assert app.store.get_record(queued.id).state == "REVOKED"
    assert app.store.get_record(later.id).state == "REVOKED"
    assert app.revoke(kept.id) is False  # finished: nothing to revoke


def test_cancel_a_running_task_interrupts_it(app: App, start_worker, tmp_path: Path) -> None:
    worker = start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task
    def long_loop(path: str) -> str:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started")
        try:
            t.sleep(30)
        except KeyboardInterrupt as exc:
            record(path, h="interrupted", why=str(exc))
            raise
        return "finished"

    @app.task
    def whoami() -> int:
        import os

        return os.getpid()

    events: list[Event] = []
    h = long_loop.apply_async((str(ledger),), on_event=events.append)
    wait_until(lambda: len(read_records(ledger)) == 1, 10, "the task to start")
    wait_until(lambda: _busy(app, h.id), 10, "the worker to report the task running")
    pid = read_records(ledger)[0]["pid"]
    assert h.cancel() is True
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=10)
    assert h.state is State.REVOKED
    # Its REVOKED says where and since when it ran (a run cut short before its STARTED
    # went out gets one made from it).
    wait_until(lambda: events and events[-1].state is State.REVOKED, 10, "the final callback")
    assert [event.state for event in events] == [State.STARTED, State.REVOKED], events
    assert events[-1].data["pid"] == pid and "started_at" in events[-1].data, events[-1]
    records = read_records(ledger)
    assert [rec["h"] for rec in records] == ["started", "interrupted"]
    assert app.store.get_record(h.id).state == "REVOKED"
    # The child handled the interrupt itself: it is still alive and serves the next task.
    assert whoami.delay().get(timeout=10) == pid
    assert pid in {p.pid for p in worker.children()}


def test_a_task_that_ignores_the_interrupt_is_killed_after_the_grace_period(
    app: App, start_worker, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task
    def stubborn(path: str) -> str:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started")
        while True:
            try:
                t.sleep(30)
            except KeyboardInterrupt:
                record(path, h="ignored")

    @app.task
    def whoami() -> int:
        import os

        return os.getpid()

    h = stubborn.delay(str(ledger))
    wait_until(lambda: len(read_records(ledger)) == 1, 10, "the task to start")
    wait_until(lambda: _busy(app, h.id), 10, "the worker to report the task running")
    pid = read_records(ledger)[0]["pid"]
    assert app.revoke(h.id, terminate=True, grace=0.5) is True
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=10)
    assert h.state is State.REVOKED
    assert [rec["h"] for rec in read_records(ledger)] == ["started", "ignored"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    replacement = whoami.delay().get(timeout=15)
    assert replacement != pid
    assert worker.process.poll() is None
    assert app.store.get_record(h.id).state == "REVOKED"


def test_revoke_every_other_task_under_load(
    app: App, start_worker, prefix: str, r: redis.Redis, access: RawBroker, tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    ledger = tmp_path / "ledger"

    @app.task
    def work(path: str, i: int) -> int:
        import time as t

        import nbtask as nb

        request = nb.current_request()
        assert request is not None
        with open(path, "a") as f:
            f.write(request.id + "\n")
        t.sleep(0.01)
        return i

    handles = work.delay_many([(str(ledger), i) for i in range(200)])
    revoked: set[str] = set()
    too_late: set[str] = set()
    for h in handles[::2]:
        (revoked if app.revoke(h.id) else too_late).add(h.id)

    _, not_done = concurrent.futures.wait(handles, timeout=30)
    assert not not_done, f"{len(not_done)} task(s) never settled"
    ran = Counter(path_line for path_line in ledger.read_text().split())
    assert revoked, "no task was still queued when revoked: the test proves nothing"
    assert len(revoked) >= 50, f"only {len(revoked)} revoked before they started"
    assert sorted(revoked & set(ran)) == [], "a task revoked before it started ran anyway"
    for h in handles:
        if h.id in revoked:
            assert h.state is State.REVOKED, h
            assert app.store.get_record(h.id).state == "REVOKED"
        else:
            assert h.result() == handles.index(h), h
            assert h.state is State.SUCCESS
            assert ran[h.id] == 1, f"{h} ran {ran[h.id]} times"
    assert too_late <= set(ran)
    wait_until(lambda: _drained(r, prefix, access), 10, "the queue to drain")


def test_cancel_while_the_previous_task_runs_its_handler(
    app: App, start_worker, tmp_path: Path
) -> None:
    # One child. Task A's on_success handler blocks until the go file exists. The child
    # takes nothing more while A's handlers run (a slot is busy until they end), so B is
    # still queued: cancelling it answers True, and B must end REVOKED and never run.
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    marker, go, ledger = tmp_path / "marker", tmp_path / "go", tmp_path / "ledger"
    _warm_up(app, tmp_path)
    try:
        a = app.send_task(SLOW_HANDLER, (str(marker), str(go)))
        b = app.send_task(MARK, (str(ledger), "B"))
        a.get(timeout=10)
        wait_until(lambda: len(read_records(marker)) == 1, 10, "A's on_success to start")
        assert app.store.get_record(b.id).state == "PENDING", "B was taken early"
        assert b.cancel() is True  # queued: revoked at once, no terminate to wait for
        assert app.store.get_record(b.id).state == "REVOKED"
    finally:
        go.touch()
    with pytest.raises(nbtask.TaskRevoked):
        b.get(timeout=10)
    assert b.state is State.REVOKED
    assert read_records(ledger) == [], "B was cancelled but ran anyway"


def test_terminate_right_after_the_worker_started(app: App, start_worker, tmp_path: Path) -> None:
    # The worker announced itself (heartbeat) and its child took the task at once; a
    # terminate sent now must not be lost because the supervisor had not yet pinned
    # its position in the control stream.
    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    try:
        h = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
        wait_until(marker.exists, 10, "the task to start")
        assert h.cancel() is True
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=5)
    finally:
        go.touch()
    assert h.state is State.REVOKED


@pytest.mark.parametrize("interrupt", ["cancel", "soft_time_limit"])
def test_a_terminate_during_an_import_waits_for_it_to_end(
    app: App, start_worker, tmp_path: Path, interrupt: str
) -> None:
    # Cut in half, the import would leave the package broken for the process's later
    # tasks (as pandas' "option has already been registered").
    start_worker(concurrency=1)
    marker = tmp_path / "importing"
    package = tmp_path / "slowpkg"
    package.mkdir()
    for name, text in SLOW_PACKAGE.items():
        (package / name).write_text(text.replace("MARKER", repr(str(marker))))
    if interrupt == "cancel":
        h = app.send_task(IMPORT_THEN_WAIT, (str(tmp_path), "slowpkg", 30.0))
        wait_until(marker.exists, 10, "the import to start")
        assert h.cancel() is True
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=10)
    else:  # the limit passes 0.5 s into the import's 2 s: it interrupts the sleep after it
        h = app.send_task(IMPORT_THEN_WAIT, (str(tmp_path), "slowpkg", 30.0), soft_time_limit=0.5)
        with pytest.raises(nbtask.SoftTimeLimitExceeded):
            h.get(timeout=20)
    again = app.send_task(IMPORT_THEN_WAIT, (str(tmp_path), "slowpkg", 0.0))
    # The same process (not killed after the grace): its package was imported whole once.
    assert again.get(timeout=10) == int(marker.read_text())


def test_a_terminate_uses_the_signal_celerys_signal_argument_names(
    app: App, start_worker, tmp_path: Path
) -> None:
    # Celery's revoke(terminate=True, signal=...), by name or number; before, a TypeError.
    # The task ignores the interrupt and the grace is long: only the signal named ends it.
    start_worker(concurrency=1)

    @app.task
    def stubborn(path: str) -> str:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started")
        while True:
            try:
                t.sleep(30)
            except KeyboardInterrupt:
                record(path, h="interrupted")

    def run(ledger: Path) -> tuple[nbtask.TaskHandle, int]:
        h = stubborn.delay(str(ledger))
        wait_until(lambda: len(read_records(ledger)) == 1, 10, "the task to start")
        wait_until(lambda: _busy(app, h.id), 10, "the worker to report the task running")
        return h, read_records(ledger)[0]["pid"]

    for how in ("control", "handle"):
        ledger = tmp_path / how
        h, pid = run(ledger)
        if how == "control":
            assert app.control.revoke(h.id, terminate=True, signal="SIGKILL", grace=600) is True
        else:  # a number, sent as is: the child does not handle SIGUSR2, which ends it
            assert h.revoke(terminate=True, signal=int(signal.SIGUSR2), grace=600) is True
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=10)
        assert [rec["h"] for rec in read_records(ledger)] == ["started"]  # never interrupted
        wait_until(lambda pid=pid: not psutil.pid_exists(pid), 10, "the child to be gone")

    h, _ = run(tmp_path / "refused")
    with pytest.raises(nbtask.ConfigurationError, match="signal='SIGNOPE' names no signal"):
        app.revoke(h.id, terminate=True, signal="SIGNOPE")
    with pytest.raises(nbtask.ConfigurationError, match="use SIGALRM themselves"):
        h.revoke(terminate=True, signal="ALRM")
    assert not h.done()  # nothing was sent
    assert app.revoke(h.id, terminate=True, signal="kill") is True
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=10)


def test_a_terminated_task_that_ends_with_an_error_of_its_own_fails_with_it(
    app: App, start_worker, tmp_path: Path
) -> None:
    # Before, any exception after a terminate was reported REVOKED, the task's own error
    # lost; an interrupt the task turns into a retry still ends it revoked, not run again.
    start_worker(concurrency=1)

    @app.task(bind=True, max_retries=3)
    def cleanup_fails(self: nbtask.Task, path: str, how: str) -> None:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started", retries=self.request.retries)
        try:
            t.sleep(30)
        except KeyboardInterrupt:
            if how == "retry":
                raise self.retry(countdown=0) from None
            raise OSError("could not write the checkpoint") from None

    @app.task
    def after() -> int:
        return 1

    for how in ("error", "retry"):
        ledger = tmp_path / how
        h = cleanup_fails.delay(str(ledger), how)
        wait_until(lambda ledger=ledger: len(read_records(ledger)) == 1, 10, "the task to start")
        wait_until(lambda h=h: _busy(app, h.id), 10, "the worker to report the task running")
        assert h.revoke(terminate=True, grace=10) is True
        if how == "error":
            with pytest.raises(OSError, match="could not write the checkpoint"):
                h.get(timeout=15)
            assert h.state is State.FAILURE
        else:
            with pytest.raises(nbtask.TaskRevoked):
                h.get(timeout=15)
            assert h.state is State.REVOKED
        assert after.delay().get(timeout=15) == 1  # behind a retry, had one been queued
        assert [rec["retries"] for rec in read_records(ledger)] == [0]
