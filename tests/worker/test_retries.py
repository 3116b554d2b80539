"""Retries: ``self.retry``, ``max_retries``, ``autoretry_for`` with
backoff, the RETRY state on the handle, and retries parked in the ETA set."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, Event, State, Task
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers


def test_retry_waits_in_the_eta_set_with_state_retry_and_its_reason(
    app: App, start_worker, prefix: str, r: redis.Redis, access: RawBroker, tmp_path: Path
) -> None:
    """The retry is a new message parked in the sorted set until its countdown passed.

    Looked at while no worker is up to take it (the first stopped once it parked it), so
    the look cannot race its countdown; the states come as the client's events, in order.
    """
    worker = start_worker()
    ledger = tmp_path / "ledger"

    @app.task(bind=True, max_retries=3)
    def flaky(self: Task, path: str) -> int:
        import time as t

        from tests.celery_tasks import record

        record(path, retries=self.request.retries, id=self.request.id, at=t.time())
        if self.request.retries < 2:
            raise self.retry(exc=ConnectionError(f"not yet {self.request.retries}"), countdown=2.0)
        return self.request.retries

    states: list[tuple[State, dict[str, Any]]] = []
    retried = threading.Event()

    def seen(event: Event) -> None:
        if event.state is not None:
            states.append((event.state, dict(event.data)))
        if event.state is State.RETRY:
            retried.set()

    h = flaky.apply_async((str(ledger),), on_event=seen)
    assert retried.wait(30), f"no RETRY; states {states}"
    worker.stop()  # idle: the retry waits in the sorted set, for no one
    assert h.state is State.RETRY
    assert "not yet 0" in h.info["reason"]
    assert h.info["retries"] == 1
    assert h.info["eta"] >= read_records(ledger)[0]["at"] + 2.0
    assert not h.done()
    # Not in the stream, and not held unacknowledged by a worker.
    assert r.zcard(f"{prefix}:eta:default") == 1
    assert access.drained()
    assert app.store.get_record(h.id).state == "RETRY"

    start_worker()
    assert h.get(timeout=30) == 2
    assert h.state is State.SUCCESS
    retries = [data for state, data in states if state is State.RETRY]
    assert [state for state, _ in states] == [State.STARTED, State.RETRY] * 2 + [
        State.STARTED,
        State.SUCCESS,
    ], states
    assert [d["retries"] for d in retries] == [1, 2]
    assert "not yet 0" in retries[0]["reason"] and "not yet 1" in retries[1]["reason"]
    runs = read_records(ledger)
    assert [run["retries"] for run in runs] == [0, 1, 2]
    assert {run["id"] for run in runs} == {h.id}, "a retry must keep the task id"
    assert r.zcard(f"{prefix}:eta:default") == 0


def test_each_run_of_a_retried_task_gives_started_first(app: App, start_worker) -> None:
    """Runs that end in a retry at once, before their worker sent STARTED, still give one.

    Each retry names the worker and when its run began, and the client makes the run's
    STARTED from it, as from a final event.
    """
    start_worker()

    @app.task(bind=True, max_retries=3)
    def quick(self: Task) -> int:
        if self.request.retries < 3:
            raise self.retry(exc=ConnectionError("not yet"), countdown=0.01)
        return self.request.retries

    events: list[Event] = []
    h = quick.apply_async(on_event=events.append)
    assert h.get(timeout=30) == 3
    wait_until(lambda: events and events[-1].state is State.SUCCESS, 15, "the final callback")
    states = [event.state for event in events if event.state is not None]
    assert states == [State.STARTED, State.RETRY] * 3 + [State.STARTED, State.SUCCESS], events
    for event in events:
        if event.state in (State.RETRY, State.SUCCESS):
            assert {"worker", "pid", "started_at"} <= set(event.data), event


def test_max_retries_exhausted_reraises_the_original_exception(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker()
    ledger = tmp_path / "ledger"

    @app.task(bind=True, max_retries=2)
    def always_fails(self: Task, path: str) -> None:
        from tests.celery_tasks import record

        record(path, retries=self.request.retries)
        raise self.retry(exc=KeyError("boom"), countdown=0.05)

    h = always_fails.delay(str(ledger))
    # Celery re-raises the cause: the task's own KeyError.
    with pytest.raises(KeyError, match="boom"):
        h.get(timeout=15)
    assert h.state is State.FAILURE
    assert [run["retries"] for run in read_records(ledger)] == [0, 1, 2]


def test_max_retries_exhausted_without_a_cause_and_per_call_override(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker()
    ledger = tmp_path / "ledger"

    @app.task(bind=True, max_retries=10)
    def no_cause(self: Task, path: str) -> None:
        from tests.celery_tasks import record

        record(path, retries=self.request.retries)
        raise self.retry(countdown=0.05, max_retries=1)  # this call's limit wins

    h = no_cause.delay(str(ledger))
    with pytest.raises(nbtask.MaxRetriesExceededError, match="1 retries"):
        h.get(timeout=15)
    assert [run["retries"] for run in read_records(ledger)] == [0, 1]


def test_autoretry_for_with_exponential_backoff_without_jitter(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker()
    ledger = tmp_path / "ledger"

    @app.task(
        bind=True,
        autoretry_for=(ConnectionError,),
        retry_backoff=0.3,
        retry_jitter=False,
        max_retries=3,
    )
    def unreachable(self: Task, path: str) -> None:
        import time as t

        from tests.celery_tasks import record

        record(path, retries=self.request.retries, at=t.time())
        raise ConnectionError(f"down on try {self.request.retries}")

    h = unreachable.delay(str(ledger))
    with pytest.raises(ConnectionError, match="down on try 3"):
        h.get(timeout=20)
    runs = read_records(ledger)
    assert [run["retries"] for run in runs] == [0, 1, 2, 3]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(runs)]
    # 0.3 s, 0.6 s, 1.2 s: never sooner than the backoff, and growing.
    for gap, delay in zip(gaps, (0.3, 0.6, 1.2), strict=True):
        assert gap >= delay - 0.02, f"retry after {gap:.3f} s, before its {delay} s backoff"
    assert gaps[0] < gaps[1] < gaps[2], f"delays did not grow: {gaps}"


def test_autoretry_for_only_the_listed_exceptions(app: App, start_worker, tmp_path: Path) -> None:
    start_worker()
    ledger = tmp_path / "ledger"

    @app.task(bind=True, autoretry_for=(ConnectionError,), default_retry_delay=0.05)
    def wrong_kind(self: Task, path: str) -> None:
        from tests.celery_tasks import record

        record(path, retries=self.request.retries)
        raise ValueError("not a connection problem")

    h = wrong_kind.delay(str(ledger))
    with pytest.raises(ValueError):
        h.get(timeout=10)
    assert len(read_records(ledger)) == 1


def test_retry_kwargs_pass_to_the_autoretry_and_dont_autoretry_for_is_left_out(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Celery's ``retry_kwargs`` ({'max_retries': 1, 'countdown': 0.1}) decide each
    automatic retry; ``dont_autoretry_for`` fails at once an exception ``autoretry_for``
    would retry (a subclass, here)."""
    start_worker()
    ledger = tmp_path / "ledger"

    @app.task(
        bind=True,
        autoretry_for=(OSError,),
        dont_autoretry_for=(FileNotFoundError,),
        retry_kwargs={"max_retries": 1, "countdown": 0.1},
    )
    def fetch(self: Task, path: str, kind: str) -> None:
        from tests.celery_tasks import record

        record(path, kind=kind, retries=self.request.retries)
        raise (FileNotFoundError if kind == "missing" else ConnectionError)(kind)

    down = fetch.delay(str(ledger), "down")
    # Without retry_kwargs: 3 retries, 180 s apart.
    with pytest.raises(ConnectionError, match="down"):
        down.get(timeout=20)
    missing = fetch.delay(str(ledger), "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        missing.get(timeout=20)
    runs = read_records(ledger)
    assert [r["retries"] for r in runs if r["kind"] == "down"] == [0, 1]
    assert [r["retries"] for r in runs if r["kind"] == "missing"] == [0]
    assert down.info["retries"] == 1 and "retries" not in missing.info


def test_retry_delay_backoff_cap_and_jitter() -> None:
    app = App("delays", settings=nbtask.Settings(insecure=True))

    @app.task(retry_backoff=True, retry_backoff_max=10, retry_jitter=False)
    def exact() -> None:
        return None

    @app.task(retry_backoff=2, retry_backoff_max=10)
    def jittered() -> None:
        return None

    @app.task(default_retry_delay=7)
    def fixed() -> None:
        return None

    assert [exact.retry_delay(n) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    for n in range(8):
        assert 0 <= jittered.retry_delay(n) <= min(2 * 2**n, 10)
    assert len({jittered.retry_delay(5) for _ in range(20)}) > 1, "no jitter"
    assert [fixed.retry_delay(n) for n in range(3)] == [7, 7, 7]
    app.close()


def test_request_fields_inside_a_bound_task(app: App, start_worker) -> None:
    start_worker()

    @app.task(bind=True)
    def introspect(self: Task, x: int, *, y: int = 0) -> dict:
        req = self.request
        return {
            "id": req.id,
            "args": list(req.args),
            "kwargs": dict(req.kwargs),
            "retries": req.retries,
            "hostname": req.hostname,
            "queue": req.queue,
            "eta": req.eta,
            "parent_id": req.parent_id,
            "root_id": req.root_id,
            "delivery_info": dict(req.delivery_info),
            "name": self.name,
            "task": req.task,
        }

    h = introspect.apply_async((1,), {"y": 2})
    seen = h.get(timeout=10)
    assert seen["id"] == h.id
    assert seen["args"] == [1]
    assert seen["kwargs"] == {"y": 2}
    assert seen["retries"] == 0
    assert seen["hostname"]
    assert seen["queue"] == "default"
    assert seen["eta"] is None
    assert seen["parent_id"] is None
    assert seen["root_id"] == h.id
    # Celery's keys too (code written for Celery reads delivery_info["routing_key"]).
    assert seen["delivery_info"] == {
        "queue": "default",
        "routing_key": "default",
        "exchange": "",
        "priority": None,
        "redelivered": False,
    }
    assert seen["name"] == seen["task"] == introspect.name  # request.task: Celery's name

    later = introspect.apply_async((3,), countdown=0.2)
    assert later.get(timeout=10)["eta"] is not None


def test_a_retry_with_its_own_arguments_runs_with_them(
    app: App, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery's self.retry(args=..., kwargs=...); before, it failed the task with a TypeError.
    # The worker splits arguments of 1000 bytes or more into blobs: the retry's large one too.
    monkeypatch.setenv("NBTASK_BLOB_THRESHOLD", "1000")
    start_worker()

    @app.task(bind=True, max_retries=3)
    def count_down(self: Task, n: int, *, seen: tuple = (), big: bytes = b"") -> tuple:
        if n > 0:
            more = {"seen": (*seen, n), "big": b"x" * 5000 * n}
            raise self.retry(args=(n - 1,), kwargs=more, countdown=0)
        return seen, len(big), self.request.retries, self.request.args

    assert count_down.delay(3).get(timeout=20) == ((3, 2, 1), 5000, 3, (0,))

    @app.task(bind=True, max_retries=1)
    def only_args(self: Task, n: int, *, label: str = "default") -> tuple:
        if self.request.retries == 0:
            raise self.retry(args=[n + 1], countdown=0)  # its own kwargs are kept
        return n, label

    assert only_args.delay(1, label="kept").get(timeout=10) == (2, "kept")
    assert only_args.apply((1,), {"label": "here"}).get() == (2, "here")


def test_default_retry_delay_0_retries_at_once(app: App, start_worker) -> None:
    # Accepted as Celery accepts it; before, it was refused when decorated.
    start_worker()

    @app.task(bind=True, default_retry_delay=0, max_retries=2)
    def flaky(self: Task) -> int:
        if self.request.retries < 2:
            raise self.retry(exc=ConnectionError("not yet"))
        return self.request.retries

    assert flaky.default_retry_delay == 0.0
    assert flaky.retry_delay(0) == 0.0
    assert flaky.delay().get(timeout=10) == 2
    assert flaky.apply().get() == 2


def test_a_retry_given_a_queue_is_sent_to_that_queue(app: App, start_worker) -> None:
    # As Celery's retry passes queue= on to apply_async (before: TypeError, unexpected
    # keyword argument 'queue'). Only a worker serving "special" can run the retry.
    start_worker(concurrency=1)
    start_worker("-Q", "special", concurrency=1)

    @app.task(bind=True)
    def moves(self: Task) -> tuple[str, str]:
        if self.request.retries == 0:
            raise self.retry(countdown=0, queue="special")
        return self.request.queue, self.request.delivery_info["queue"]

    assert moves.delay().get(timeout=15) == ("special", "special")
