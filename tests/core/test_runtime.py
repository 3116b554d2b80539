"""The runtime on the real Redis: round trips, handles, errors, ETA, expiry, revocation,
many concurrent tasks, and re-attaching to a task from a second process."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from helpers import client_env, remote_of, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State

pytestmark = pytest.mark.brokers


ADD = "tests.sample_tasks.add"
CHATTY = "tests.sample_tasks.chatty"
EXPLODE = "tests.sample_tasks.explode"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"
SLOW_EARLY = "tests.sample_tasks.slow_early"
STARTED_AT = "tests.sample_tasks.started_at"


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# Round trips --------------------------------------------------------------------------------
def test_module_task_by_name_with_output_progress_and_callbacks(app: App, start_worker) -> None:
    start_worker()
    called = threading.Event()
    seen: list[concurrent.futures.Future] = []

    def on_done(future: concurrent.futures.Future) -> None:
        seen.append(future)
        called.set()

    h = app.send_task(CHATTY, (3,))
    h.add_done_callback(on_done)
    assert h.get(timeout=10) == 3
    assert h.state is State.SUCCESS
    assert h.ready()
    assert h.successful()
    assert not h.failed()
    assert h.progress is not None
    assert (h.progress.done, h.progress.total, h.progress.message) == (3.0, 3.0, "counting")
    assert "line 0\n" in h.stdout
    assert "line 2\n" in h.stdout
    assert called.wait(5), "add_done_callback was never called"
    assert seen == [h]
    # A callback added after completion runs at once, like any Future's.
    late = threading.Event()
    h.add_done_callback(lambda _f: late.set())
    assert late.is_set()


def test_function_by_value_kwargs_none_and_large_result(app: App, start_worker) -> None:
    start_worker()

    @app.task
    def combine(x: int, *, scale: int = 1, suffix: str = "") -> str:
        return f"{x * scale}{suffix}"

    @app.task
    def nothing() -> None:
        print("side effect only")

    @app.task
    def blob(n: int) -> bytes:
        return bytes(range(256)) * n

    h_kwargs = combine.apply_async((7,), {"scale": 6, "suffix": "!"})
    h_delay_kwargs = combine.delay(x=2, scale=3)
    h_none = nothing.delay()
    h_big = blob.delay(20_000)  # about 5 MB

    assert h_kwargs.get(timeout=10) == "42!"
    assert h_delay_kwargs.get(timeout=10) == "6"
    assert h_none.get(timeout=10) is None
    assert h_none.successful() and h_none.state is State.SUCCESS
    assert "side effect only" in h_none.stdout
    big = h_big.get(timeout=20)
    assert len(big) == 256 * 20_000
    assert hashlib.sha256(big).digest() == hashlib.sha256(bytes(range(256)) * 20_000).digest()


def test_futures_wait_over_handles(app: App, start_worker) -> None:
    start_worker()
    handles = [app.send_task(ADD, (i, i)) for i in range(20)]
    done, not_done = concurrent.futures.wait(handles, timeout=15)
    assert not not_done
    assert done == set(handles)
    assert [h.result() for h in handles] == [2 * i for i in range(20)]
    first = app.send_task(ADD, (1, 1))
    done, _ = concurrent.futures.wait([first], return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {first}


def test_many_concurrent_tasks_none_lost_none_duplicated(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    start_worker(concurrency=2)
    ledger = tmp_path / "ledger"

    @app.task
    def square(path: str, x: int) -> int:
        import nbtask as nb

        request = nb.current_request()
        assert request is not None
        # One short O_APPEND write per run: atomic between processes.
        with open(path, "a") as f:
            f.write(request.id + "\n")
        return x * x

    many = square.delay_many([(str(ledger), i) for i in range(2000)])
    from_threads: dict[int, list[nbtask.TaskHandle]] = {}

    def send(offset: int) -> None:
        from_threads[offset] = [square.delay(str(ledger), offset + i) for i in range(100)]

    threads = [threading.Thread(target=send, args=(base,)) for base in (10_000, 20_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    expected = {h.id: i * i for i, h in enumerate(many)}
    for base, handles in from_threads.items():
        expected.update({h.id: (base + i) ** 2 for i, h in enumerate(handles)})
    handles = many + [h for hs in from_threads.values() for h in hs]
    assert len(expected) == len(handles) == 2200  # ids are unique

    _, not_done = concurrent.futures.wait(handles, timeout=60)
    assert not not_done, f"{len(not_done)} task(s) never finished"
    for h in handles:
        assert h.result() == expected[h.id], h
        assert h.state is State.SUCCESS
    runs = Counter(lines(ledger))
    assert set(runs) == set(expected), "a task ran that was not sent, or one never ran"
    assert [tid for tid, n in runs.items() if n != 1] == [], "some tasks ran more than once"


# Errors -------------------------------------------------------------------------------------
def test_remote_exception_comes_back_as_its_own_type(app: App, start_worker) -> None:
    start_worker()
    h = app.send_task(EXPLODE, ("bad input 42",))
    with pytest.raises(ValueError, match="bad input 42") as info:
        h.get(timeout=10)
    assert info.value.args == ("bad input 42",)  # the exception itself, not a copy of its text
    err = remote_of(info.value)
    assert err.ename == "ValueError"
    assert err.evalue == "bad input 42"
    assert "explode" in err.traceback
    assert "_explode_helper" in err.traceback
    assert err.task_id == h.id
    assert "ValueError: bad input 42" in str(err)
    assert h.state is State.FAILURE
    assert h.failed() and not h.successful()

    @app.task
    def local_failure(n: int) -> float:
        return 1 / n

    with pytest.raises(ZeroDivisionError) as info2:
        local_failure.delay(0).get(timeout=10)
    assert "local_failure" in remote_of(info2.value).traceback
    try:  # `except` with the task's own type works around get()
        local_failure.delay(0).get(timeout=10)
    except ZeroDivisionError as caught:
        assert caught.task_id  # type: ignore[attr-defined]


def test_unknown_task_name_lists_registered_names(app: App, start_worker) -> None:
    start_worker()
    h = app.send_task("tests.sample_tasks.no_such_task", (1,))
    with pytest.raises(nbtask.NotRegistered) as info:
        h.get(timeout=10)
    err = info.value
    assert "tests.sample_tasks.no_such_task" in str(err)
    assert ADD in str(err)
    assert "tests.sample_tasks.slow_marker" in str(err)
    assert h.state is State.FAILURE


def test_unpicklable_argument_raises_at_call_site_and_sends_nothing(
    app: App, prefix: str, r: redis.Redis, access: RawBroker
) -> None:
    @app.task
    def use(value: object, other: object = None) -> None:
        return None

    with pytest.raises(nbtask.SerializationError) as info:
        use.delay(1, other=threading.Lock())
    text = str(info.value)
    assert "'other'" in text
    assert "lock" in text.lower()

    with pytest.raises(nbtask.SerializationError) as info2:
        app.send_task(ADD, (threading.Lock(), 2))
    assert "argument 0" in str(info2.value)

    assert access.drained()
    assert r.zcard(f"{prefix}:eta:default") == 0
    assert list(r.scan_iter(match=f"{prefix}:r:*")) == []


# ETA, expiry, revocation -------------------------------------------------------------------
def test_countdown_waits_in_the_eta_set_then_runs(
    app: App, start_worker, prefix: str, r: redis.Redis, access: RawBroker
) -> None:
    start_worker()
    sent = time.time()
    # Long enough for the checks below (rabbitmqctl alone can take a second or two).
    h = app.send_task(STARTED_AT, countdown=3.0)
    # Not on the queue, where a worker could hold it unacknowledged: in the sorted set.
    assert r.zcard(f"{prefix}:eta:default") == 1
    assert h.state is State.PENDING
    assert access.drained()
    began = h.get(timeout=15)
    assert began >= sent + 2.95, f"started {began - sent:.3f} s after sending, before its ETA"
    assert h.state is State.SUCCESS
    assert r.zcard(f"{prefix}:eta:default") == 0


def test_expires_in_the_past_is_revoked(app: App, start_worker) -> None:
    start_worker()
    h = app.send_task(ADD, (1, 2), expires=-1.0)
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=10)
    assert h.state is State.REVOKED
    assert not h.failed() and not h.successful()  # Celery's: a revoked task has not failed


def test_cancel_a_queued_task_then_it_never_runs(
    app: App, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    h = app.send_task(SLOW_EARLY, (str(marker), 0.0))
    assert h.cancel() is True
    # The revoked event reaches the handle through the listener.
    with pytest.raises(nbtask.TaskRevoked):
        h.get(timeout=5)
    assert h.state is State.REVOKED
    assert h.cancel() is False  # already final

    start_worker()
    # The worker takes the revoked message and drops it: the queue drains, nothing pending.
    wait_until(access.drained, 10, "the worker to drop the revoked message")
    assert not marker.exists(), "a revoked task ran"
    assert app.store.get_record(h.id).state == "REVOKED"
    # The worker is healthy and serves the next task.
    assert app.send_task(ADD, (2, 2)).get(timeout=10) == 4
    assert not marker.exists()


# Re-attaching from another process ---------------------------------------------------------
REATTACH_SCRIPT = r"""
import json, sys, time
from nbtask import App, Settings, TaskNotFound, State

cfg = json.loads(sys.argv[1])
app = App("reattach", settings=Settings.from_env())
name = lambda state: getattr(state, "value", str(state))  # printable whatever .state returns
for task_id in cfg["ids"]:
    try:
        h = app.handle(task_id)
    except TaskNotFound as exc:
        print(json.dumps({"id": task_id, "not_found": str(exc)}), flush=True)
        continue
    deadline = time.monotonic() + 10
    while h.state is State.PENDING and time.monotonic() < deadline:
        time.sleep(0.02)
    print(json.dumps({"id": task_id, "attached": name(h.state)}), flush=True)
    result = h.get(timeout=20)
    print(json.dumps({"id": task_id, "state": name(h.state), "result": result,
                      "stdout": h.stdout}), flush=True)
app.close()
print("DONE", flush=True)
"""


def _line_reader(stream) -> queue.Queue[str]:
    lines_q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for raw in iter(stream.readline, b""):
            lines_q.put(raw.decode())
        lines_q.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines_q


def _next_line(lines_q: queue.Queue[str], proc: subprocess.Popen[bytes]) -> dict:
    try:
        line = lines_q.get(timeout=20)
    except queue.Empty:
        raise AssertionError("the re-attaching process printed nothing for 20 s") from None
    if not line:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(f"the re-attaching process ended early:\n{err}")
    return json.loads(line)


def test_reattach_from_a_second_process(
    app: App, start_worker, settings: Settings, tmp_path: Path
) -> None:
    start_worker()
    finished = app.send_task(ADD, (20, 22))
    assert finished.get(timeout=10) == 42

    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(lambda: running.state is State.STARTED, 10, "the task to start")
    unknown = "0" * 32

    cfg = {"ids": [finished.id, running.id, unknown]}
    proc = subprocess.Popen(
        [sys.executable, "-c", REATTACH_SCRIPT, json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(settings),
    )
    try:
        out = _line_reader(proc.stdout)
        assert _next_line(out, proc) == {"id": finished.id, "attached": "SUCCESS"}
        first = _next_line(out, proc)
        assert (first["state"], first["result"]) == ("SUCCESS", 42)

        assert _next_line(out, proc) == {"id": running.id, "attached": "STARTED"}
        assert not running.done()
        go.touch()
        second = _next_line(out, proc)
        assert second["state"] == "SUCCESS"
        assert second["result"] == running.get(timeout=10)
        assert "waiting for the go file" in second["stdout"]

        third = _next_line(out, proc)
        assert third["id"] == unknown
        assert "no task" in third["not_found"]
        assert proc.wait(20) == 0
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines(marker) == [str(running.result())]


def test_unknown_id_in_this_process_raises_task_not_found(app: App) -> None:
    with pytest.raises(nbtask.TaskNotFound):
        app.handle("f" * 32)
