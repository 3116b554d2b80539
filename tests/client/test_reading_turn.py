"""Who reads a client's events: a thread waiting in ``get()``, else the listener thread.

Real Redis and real workers; the client's connections go through a proxy where an
outage is needed.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import wait_until
from tcp_proxy import TcpProxy, via
from worker_process import WorkerProcess

from nbtask import App, Settings
from nbtask.core.handle import TaskHandle
from nbtask.wire.events import FINAL_STATES, Event, State

ADD = "tests.sample_tasks.add"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def reader_of(app: App) -> threading.Thread | None:
    """The thread holding the app's reading turn now, if any."""
    listener = app._listener
    return None if listener is None else listener._reader


def waiting_in_get(handle: TaskHandle, out: dict[str, object]) -> threading.Thread:
    """A started thread waiting for ``handle``'s result, which it puts in ``out``."""

    def wait() -> None:
        out["value"] = handle.get(timeout=60)

    thread = threading.Thread(target=wait, name="waiting-in-get", daemon=True)
    thread.start()
    return thread


def test_a_waiting_thread_reads_its_result_and_serves_other_handles(
    app: App, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    assert app.send_task(ADD, (1, 1)).get(timeout=15) == 2
    go = tmp_path / "go"
    slow = app.send_task(WAIT_FOR_FILE, (str(tmp_path / "marker"), str(go)))
    out: dict[str, object] = {}
    waiter = waiting_in_get(slow, out)
    wait_until(lambda: reader_of(app) is waiter, 15, "the waiting thread to read the events")

    # A task nobody waits on: its events are applied by the thread that reads them.
    readers: dict[str, str] = {}

    def note(event: Event) -> None:
        if event.state in FINAL_STATES:
            readers[event.task_id] = threading.current_thread().name

    other = app.send_task(ADD, (2, 3), on_event=note)
    done, _ = concurrent.futures.wait([other], timeout=15)
    assert other in done and other.result() == 5
    assert readers == {other.id: "waiting-in-get"}
    assert not slow.done()

    go.touch()
    waiter.join(30)
    assert slow.state is State.SUCCESS and out["value"] == slow.result()


def test_the_listener_reads_again_once_the_waiter_left(
    app: App, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    go = tmp_path / "go"
    slow = app.send_task(WAIT_FOR_FILE, (str(tmp_path / "marker"), str(go)))
    with pytest.raises(TimeoutError):
        slow.get(timeout=0.5)  # this thread read the events meanwhile, then left
    readers: list[str] = []
    slow.on_event(lambda event: readers.append(threading.current_thread().name))
    go.touch()
    done, _ = concurrent.futures.wait([slow], timeout=30)  # nobody reads in get()
    assert slow in done and slow.state is State.SUCCESS
    assert readers and set(readers) == {"nbtask-listener"}


def test_a_get_that_times_out_again_and_again_leaves_one_hook_on_its_handle(
    app: App, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    go = tmp_path / "go"
    first = app.send_task(WAIT_FOR_FILE, (str(tmp_path / "marker"), str(go)))
    polled = app.send_task(WAIT_FOR_FILE, (str(tmp_path / "marker"), str(go)))
    out: dict[str, object] = {}
    waiter = waiting_in_get(first, out)
    wait_until(lambda: reader_of(app) is waiter, 15, "the waiting thread to read the events")
    # Polled while another thread reads: each get() waits for that reader, and none may
    # leave a done callback behind (a loop polling for hours would pile them up).
    for _ in range(50):
        with pytest.raises(TimeoutError):
            polled.get(timeout=0.001)
    assert len(polled._done_callbacks) <= 1  # concurrent.futures.Future's own list
    go.touch()
    waiter.join(30)
    assert polled.get(timeout=30) and out["value"] == first.result()


def test_a_turn_left_by_a_read_a_ctrl_c_cut_is_taken_up_by_the_next_get(
    app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 1)).get(timeout=15) == 2
    listener = app._listener
    assert listener is not None
    # A KeyboardInterrupt landing between taking the turn and the read's clean-up leaves
    # this thread as the reader, though it reads no more (the window is a few bytecodes:
    # set here as it would be left).
    with listener._lock:
        listener._reader = threading.current_thread()
    assert app.send_task(ADD, (2, 3)).get(timeout=15) == 5
    assert reader_of(app) is None


def test_a_ctrl_c_while_handing_the_turn_on_leaves_it_to_the_listener(
    app: App, start_worker: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker(concurrency=1)
    assert app.send_task(ADD, (1, 1)).get(timeout=15) == 2
    listener = app._listener
    assert listener is not None
    hand_on = listener._hand_on
    me = threading.current_thread()

    def cut(reader: threading.Thread) -> None:
        # A KeyboardInterrupt while this thread waits for the lock to hand the turn on.
        if reader is not me:  # the listener thread read this time
            return hand_on(reader)
        monkeypatch.setattr(listener, "_hand_on", hand_on)
        raise KeyboardInterrupt

    monkeypatch.setattr(listener, "_hand_on", cut)
    # On a busy machine the listener thread may read a result first: send until this
    # thread has read one itself.
    for _ in range(50):
        try:
            app.send_task(ADD, (2, 3)).get(timeout=15)
        except KeyboardInterrupt:
            break
    else:
        pytest.fail("this thread never read a result itself")
    assert reader_of(app) is not me
    # This thread waits no more: a task nobody waits on still gets its result, read by
    # the listener thread.
    unwatched = app.send_task(ADD, (3, 4))
    wait_until(unwatched.done, 15, "the listener to read the result")
    assert unwatched.result() == 7


def test_a_ctrl_c_in_get_ends_its_traceback_at_get_and_the_task_runs_on(
    app: App, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    go = tmp_path / "go"
    slow = app.send_task(WAIT_FOR_FILE, (str(tmp_path / "marker"), str(go)))
    wait_until(lambda: slow.state is State.STARTED, 15, "the task to start")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt) as info:
        slow.get(timeout=30)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "get", frames  # none of the frames that were reading events
    assert reader_of(app) is not threading.current_thread()
    assert slow.state is State.STARTED  # it runs on
    go.touch()
    assert slow.get(timeout=15) is not None


def test_a_tasks_exception_raised_by_get_shows_no_frames_of_the_wait(
    app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    failing = app.send_task("tests.sample_tasks.explode", ("boom",))
    for _ in range(2):  # a second get() shows no more than the first
        with pytest.raises(ValueError, match="boom") as info:
            failing.get(timeout=15)
        frames = traceback.extract_tb(info.value.__traceback__)
        assert [frame.name for frame in frames[1:]] == ["get"], frames
        assert "explode" in info.value.__cause__.traceback  # type: ignore[union-attr]


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the real Redis, stopped after the test."""
    target = urlsplit(redis_url)
    opened = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    opened.start()
    yield opened
    opened.stop()


def test_an_outage_while_a_thread_waits_loses_no_final_state(
    app: App,
    settings: Settings,
    redis_url: str,
    proxy: TcpProxy,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    start_worker(concurrency=1)  # straight to Redis: only the client is cut off
    cut_off = App("cut-off", settings=settings.replace(broker_url=via(redis_url, proxy.url_port)))
    try:
        go = tmp_path / "go"
        slow = cut_off.send_task(WAIT_FOR_FILE, (str(tmp_path / "marker"), str(go)))
        out: dict[str, object] = {}
        waiter = waiting_in_get(slow, out)
        wait_until(lambda: reader_of(cut_off) is waiter, 15, "the waiting thread to read")
        proxy.refuse()  # its read fails, and so does every new connection
        go.touch()  # the task ends while its client cannot hear it
        store = app.store  # the same records, not through the proxy
        wait_until(
            lambda: (
                (record := store.get_record(slow.id)) is not None and record.state is State.SUCCESS
            ),
            30,
            "the task to end during the outage",
        )
        assert not slow.done()
        proxy.accept_again()
        waiter.join(60)
        assert slow.state is State.SUCCESS and out["value"] == slow.result()
    finally:
        cut_off.close()
