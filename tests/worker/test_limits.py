"""Time limits and rate limits."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import math
import time
import types
from pathlib import Path

import psutil
import pytest
import redis
from helpers import wait_for_housekeeping, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

import nbtask
from nbtask import App, State, Task
from nbtask.worker import admit
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers

HARD_LIMITED_SLEEP = "tests.celery_tasks.hard_limited_sleep"


def _child_pids(worker) -> set[int]:
    return {p.pid for p in worker.children() if p.is_running()}


# Soft limit ---------------------------------------------------------------------------------
def test_soft_time_limit_raises_inside_the_task_which_can_return(app: App, start_worker) -> None:
    start_worker()

    @app.task(soft_time_limit=0.5)
    def cleans_up() -> str:
        import time as t

        from nbtask import SoftTimeLimitExceeded

        try:
            t.sleep(10)
        except SoftTimeLimitExceeded as exc:
            return f"cleaned up after: {exc}"
        return "never interrupted"

    @app.task(soft_time_limit=0.3)
    def does_not_catch() -> None:
        import time as t

        t.sleep(10)

    h = cleans_up.delay()
    assert h.get(timeout=10).startswith("cleaned up after")
    assert h.state is State.SUCCESS

    with pytest.raises(nbtask.SoftTimeLimitExceeded):
        does_not_catch.delay().get(timeout=10)


def test_soft_limit_does_not_leak_into_the_next_task(app: App, start_worker) -> None:
    start_worker(concurrency=1)

    @app.task(soft_time_limit=0.5)
    def quick() -> int:
        return 1

    @app.task
    def longer() -> str:
        import time as t

        t.sleep(1.0)
        return "finished"

    assert quick.delay().get(timeout=10) == 1
    # The alarm of the first task must have been cancelled when it returned.
    assert longer.delay().get(timeout=10) == "finished"


# Hard limit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("acks_late", [False, True], ids=["early_ack", "acks_late"])
def test_hard_time_limit_kills_the_child_which_is_replaced(
    app: App, start_worker, access: RawBroker, tmp_path: Path, acks_late: bool
) -> None:
    worker = start_worker(concurrency=1)
    ledger = tmp_path / "ledger"

    @app.task(time_limit=1, acks_late=acks_late)
    def stuck(path: str) -> None:
        import time as t

        from tests.celery_tasks import record

        record(path, h="started")
        while True:  # ignores everything but SIGKILL
            with contextlib.suppress(BaseException):
                t.sleep(30)

    @app.task
    def whoami() -> int:
        import os

        return os.getpid()

    before = whoami.delay().get(timeout=10)
    h = stuck.delay(str(ledger))
    with pytest.raises(nbtask.RemoteError) as info:
        h.get(timeout=15)
    assert info.value.ename == "TimeLimitExceeded"
    assert "TimeLimitExceeded" not in str(info.value)  # Python prints the type beside it
    assert h.state is State.FAILURE
    killed = read_records(ledger)[0]["pid"]
    assert killed == before
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"
    # The supervisor replaced the child and keeps serving.
    after = whoami.delay().get(timeout=15)
    assert after != killed
    assert after in _child_pids(worker)
    assert worker.process.poll() is None
    # Not run again, acks_late or not: a kill for the time limit is an outcome, not a loss
    # (a message put back would have run on the only child before whoami's).
    wait_for_housekeeping(app)
    wait_for_housekeeping(app)
    assert len(read_records(ledger)) == 1
    assert access.drained()
    assert h.state is State.FAILURE


def test_a_task_interrupted_with_a_long_grace_still_ends_at_its_hard_time_limit(
    app: App, start_worker
) -> None:
    """A terminate's grace (a notebook's Stop gives one without end) never outlasts the limit."""
    start_worker(concurrency=1)

    @app.task(time_limit=3)
    def stubborn() -> None:
        import time as t

        print("started", flush=True)
        while True:  # ignores everything but SIGKILL
            with contextlib.suppress(BaseException):
                t.sleep(30)

    h = stubborn.delay()
    wait_until(lambda: "started" in h.stdout, 15, "the task to start")
    assert app.revoke(h.id, terminate=True, grace=3600.0)
    with pytest.raises(nbtask.RemoteError) as info:
        h.get(timeout=30)
    assert info.value.ename == "TimeLimitExceeded"


def test_per_call_time_limit_overrides_the_task(app: App, start_worker) -> None:
    start_worker(concurrency=1)

    @app.task(time_limit=30)
    def sleeper(seconds: float) -> str:
        import time as t

        t.sleep(seconds)
        return "slept"

    with pytest.raises(nbtask.RemoteError) as info:
        sleeper.apply_async((20,), time_limit=1).get(timeout=15)
    assert info.value.ename == "TimeLimitExceeded"

    @app.task(soft_time_limit=30)
    def soft_sleeper(seconds: float) -> str:
        import time as t

        from nbtask import SoftTimeLimitExceeded

        try:
            t.sleep(seconds)
        except SoftTimeLimitExceeded:
            return "soft limit"
        return "slept"

    assert soft_sleeper.apply_async((20,), soft_time_limit=0.3).get(timeout=15) == "soft limit"
    assert sleeper.delay(0.1).get(timeout=10) == "slept"


def test_time_limit_declared_on_a_module_task_is_honoured_when_sent_by_name(
    app: App, start_worker
) -> None:
    # The client does not import the module (Celery's send_task): the worker's own
    # definition says time_limit=1, and the worker must enforce it.
    start_worker("-A", "tests.celery_tasks", concurrency=1)
    h = app.send_task(HARD_LIMITED_SLEEP, (8,))
    with pytest.raises(nbtask.RemoteError) as info:
        h.get(timeout=6)
    assert info.value.ename == "TimeLimitExceeded"


# Rate limits --------------------------------------------------------------------------------
def _assert_spaced(starts: list[float], rate: float) -> None:
    """Check that ``starts`` kept to ``rate`` per second: any ``k`` later starts are at
    least ``k / rate`` apart.

    Each is the limiter's own, read by the task it started from its bucket (the last
    start, kept to the microsecond), not the clock read in its body: a loaded machine runs
    a body any time after its start (0.24 s seen), and two starts looked closer than the
    limiter gave them. A body run after the next start was given reads that one: a start
    read twice counts once (there are at least as many starts between two as are read).
    """
    read = sorted(set(starts))
    for (i, a), (j, b) in itertools.combinations(enumerate(read), 2):
        least = (j - i) / rate - 1e-6  # (a float's rounding)
        assert b - a >= least, (
            f"rate_limit='{rate:g}/s' let starts {i} and {j} come {b - a:.6f} s apart "
            f"(at least {least:.6f} s): {read}"
        )


def _rate_bucket(prefix: str, worker: WorkerProcess, task: Task) -> str:
    """The key of ``worker``'s rate-limit bucket for ``task``: the last start it gave."""
    worker_id, _ = worker.entry()
    return f"{prefix}:rate:{worker_id}:{task.name}"


def test_rate_limit_spaces_starts_without_delaying_other_tasks(
    app: App, start_worker, prefix: str, r: redis.Redis, redis_url: str
) -> None:
    worker = start_worker(concurrency=2)

    @app.task(rate_limit="5/s")
    def limited(i: int) -> float:
        import redis as client

        with client.Redis.from_url(redis_url) as store:
            return float(store.get(bucket))  # this start (or the next, if run late)

    bucket = _rate_bucket(prefix, worker, limited)

    @app.task
    def free(i: int) -> float:
        import time as t

        return t.time()

    # Warm both children so the first starts are not spread by process start-up.
    assert free.delay(0).get(timeout=10)
    slow = [limited.delay(i) for i in range(8)]
    fast = [free.delay(i) for i in range(6)]
    ran = [h.get(timeout=30) for h in fast]
    starts = [h.get(timeout=30) for h in slow]
    # The unlimited tasks, sent after the limited ones, did not wait for them: they ran
    # before the last of those started (both times read on the worker's host, not when
    # this client heard of them, which a loaded machine delays).
    assert max(ran) < max(starts), "unlimited tasks waited behind limited ones"

    _assert_spaced(starts, rate=5)
    assert all(h.state is State.SUCCESS for h in slow)
    # Waiting tasks were parked, not held by a child.
    assert r.zcard(f"{prefix}:eta:default") == 0


def test_rate_limited_tasks_start_in_the_order_they_were_sent(
    app: App, start_worker, prefix: str, redis_url: str
) -> None:
    """Each call over the limit is given the next free start when it is put back, so the
    calls start in turn, as from a queue: none waits behind calls sent after it."""
    worker = start_worker(concurrency=1)

    @app.task(rate_limit="4/s")
    def limited(i: int) -> float:
        import redis as client

        with client.Redis.from_url(redis_url) as store:
            # Its own start: one child, so the next is given once this body has run.
            return float(store.get(bucket))

    bucket = _rate_bucket(prefix, worker, limited)
    handles = [limited.delay(i) for i in range(8)]
    starts = [h.get(timeout=30) for h in handles]
    order = sorted(range(8), key=lambda i: starts[i])
    assert order == list(range(8)), f"started in the order {order}"
    assert len(set(starts)) == 8, starts
    _assert_spaced(starts, rate=4)


def test_a_task_over_its_rate_limit_is_parked_until_the_start_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parked until the start the store gave it (the time of asking plus the wait), not
    for the wait counted from a later look at the clock. Before, a child paused between
    the store's answer and that look (a loaded machine) parked the task past its start,
    and the task given the start after it could come back first and take its turn: the
    order test above saw the starts 0, 1, 3, 4, 5, 6, 7, 2 on RabbitMQ."""
    clock = [1000.0]
    given = 1000.5  # the start the store gives
    monkeypatch.setattr(admit, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def rate_wait(bucket: str, rate: float, task_id: str, horizon: float) -> float:
        wait = given - clock[0]
        clock[0] += 0.3  # the child pauses before it looks at the clock again
        return wait

    parked: list[float] = []

    def finish(delivery, task_id, client, raw, fields, *, requeue) -> None:
        parked.append(requeue[1])

    store = types.SimpleNamespace(rate_wait=rate_wait)
    transport = types.SimpleNamespace(store=store, finish=finish)
    admission = admit.Admission(
        nbtask.Settings(), transport, None, None, None, hostname="h", consumer="c", worker_id="w"
    )
    message = types.SimpleNamespace(id="t", name="limited", client="c")
    admitted = types.SimpleNamespace(message=message, delivery=types.SimpleNamespace(raw=b"m"))
    assert admission.rate_limited(admitted, types.SimpleNamespace(rate_limit=2.0))
    assert parked == [given], f"parked until {parked}, given the start {given}"


def test_rate_limit_per_minute_holds_back_the_second_call(app: App, start_worker) -> None:
    start_worker(concurrency=2)

    @app.task(rate_limit="1/m")
    def once_a_minute() -> int:
        return 1

    @app.task
    def free() -> int:
        return 2

    calls = [once_a_minute.delay(), once_a_minute.delay()]
    done, _ = concurrent.futures.wait(
        calls, timeout=10, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert len(done) == 1
    (first,) = done
    (second,) = [h for h in calls if h is not first]
    assert first.result() == 1
    # The other child is not blocked by the parked call.
    assert free.delay().get(timeout=10) == 2
    assert not second.done()
    assert second.state is State.PENDING


def test_worker_disable_rate_limits(
    app: App, start_worker, prefix: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBTASK_WORKER_DISABLE_RATE_LIMITS", "1")
    start_worker(concurrency=2)

    @app.task(rate_limit="1/m")
    def once_a_minute(i: int) -> int:
        return i

    # With limits on, only one call could start this minute.
    handles = [once_a_minute.delay(i) for i in range(6)]
    assert [h.get(timeout=10) for h in handles] == list(range(6))
    # The rate-limit code path was skipped entirely: no bucket was ever written.
    assert list(r.scan_iter(match=f"{prefix}:rate:*")) == []


@pytest.mark.parametrize("planted", ["inf", "1e300", "not a number", "another type"])
def test_a_rate_limit_bucket_nbtask_did_not_write_is_reset_not_waited_for(
    app: App, start_worker, prefix: str, r: redis.Redis, planted: str
) -> None:
    """A worker's bucket (``<prefix>:rate:<worker>:<task>``) holds the time its token was
    last taken: infinity or a time to come there parked the task for ever."""
    worker = start_worker(concurrency=1)

    @app.task(rate_limit="1/m")
    def limited() -> int:
        return 1

    bucket = _rate_bucket(prefix, worker, limited)
    if planted == "another type":
        r.hset(bucket, "junk", "1")
    else:
        r.set(bucket, planted)
    assert limited.delay().get(timeout=10) == 1
    said = [line for line in worker.log.read_text().splitlines() if "did not write" in line]
    assert len(said) == 1 and bucket in said[0], said
    second = limited.delay()  # the bucket is nbtask's again: the limit holds
    with pytest.raises(TimeoutError):
        second.get(timeout=1)


@pytest.mark.brokers("redis")  # (the store is Redis on both)
def test_a_start_is_a_gap_after_the_last_to_the_microsecond(
    access: RawBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The times a bucket keeps are written in full: Lua's ``tostring`` keeps 14 digits,
    which put a start given at 1796564382.87735 at 1796564382.8774 (50 us later)."""
    now = 1796564382.87735
    monkeypatch.setattr("nbtask.brokers.redis_store.time", types.SimpleNamespace(time=lambda: now))
    store = access.keys
    assert store.rate_wait("w:limited", 0.1, "first", 3600.0) == 0
    assert store.rate_wait("w:limited", 0.1, "next", 3600.0) == pytest.approx(10.0, abs=1e-6)


@pytest.mark.brokers("redis")  # (the store is Redis on both)
def test_a_start_another_workers_bucket_gave_is_no_start_in_this_ones(access: RawBroker) -> None:
    """Rate limits are per worker. A task put back by one worker for a start in its
    schedule (``rate_slot``) and then taken by another (the first died, or the other came
    first) is given a start in the other's schedule, after those it gave out already: it
    takes none of theirs, and waits for no start of the first one's."""
    store, rate, horizon = access.keys, 0.1, 3600.0  # a start every 10 s

    def wait(worker: str, task_id: str) -> int:
        """The wait, in whole starts' worth of seconds (calls take a moment in between)."""
        return math.ceil(store.rate_wait(f"{worker}:limited", rate, task_id, horizon) / 10) * 10

    assert wait("gone", "first") == 0
    assert wait("gone", "moved") == 10
    assert wait("gone", "far") == 20
    assert wait("here", "ran") == 0
    assert wait("here", "waits") == 10
    assert wait("here", "moved") == 20, "took the start another task was given"
    assert wait("here", "later") == 30
    assert wait("idle", "far") == 0, "waited for a start another worker's schedule gave"
    assert wait("idle", "far-next") == 10  # the idle one's schedule holds


@pytest.mark.brokers("redis")  # (the store is Redis on both)
def test_tasks_put_back_that_all_come_back_late_keep_their_turns(access: RawBroker) -> None:
    """A worker slow to take back the tasks it put back (a loaded machine) finds every
    start they were given past: the first starts, and each after it is given the start
    after the one before it, in turn, not one start for all of them to race for (whichever
    came back first would take it)."""
    store, rate, horizon = access.keys, 1.0, 3600.0  # a start a second

    def wait(task_id: str) -> int:
        """The wait, in whole starts' worth of seconds (calls take a moment in between)."""
        return math.ceil(store.rate_wait("slow:limited", rate, task_id, horizon))

    assert [wait(task) for task in ("first", "a", "b", "c")] == [0, 1, 2, 3]
    late = time.time() + 3.5
    wait_until(lambda: time.time() > late, 10, "every start given out to be past")
    assert wait("a") == 0  # late: at once
    assert [wait("b"), wait("c")] == [1, 2], "the tasks after a late start lost their turns"


def test_a_task_given_a_start_by_a_worker_now_gone_runs_when_another_is_free(
    app: App, start_worker, access: RawBroker
) -> None:
    """The task's record holds a start a minute away, given by a worker that is gone (it
    would have put the task back for then); the worker that takes it has no other start
    given out, so it runs at once."""
    start_worker(concurrency=1)

    @app.task(rate_limit="1/m")
    def limited() -> int:
        return 1

    handle = limited.apply_async(countdown=1.0)
    bucket, horizon = f"gone-worker-1:{limited.name}", app.settings.replay_window
    assert access.keys.rate_wait(bucket, 1 / 60, "before", horizon) == 0
    assert access.keys.rate_wait(bucket, 1 / 60, handle.id, horizon) > 50
    assert handle.get(timeout=15) == 1
