"""A task's events reach its client at once, rate-capped, in order, on both brokers.

The outbox tests drive a worker's :class:`Outbox` over the real broker with a clock they
move by hand, so they say *when* it sends in terms of the cap, never in seconds: an event
after a quiet spell goes out while the clock stands still; a burst waits for the cap's
end and goes as one send. The client side (``on_event``) is tried through real workers.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from helpers import wait_until
from worker_process import WorkerProcess

from nbtask import App, Event, EventType, State, TaskHandle
from nbtask.brokers import Transport, open_broker
from nbtask.wire.envelope import Signer
from nbtask.wire.events import decode_event
from nbtask.worker.outbox import CAP_SECONDS, Outbox

pytestmark = pytest.mark.brokers

CHATTY = "tests.sample_tasks.chatty"
ADD = "tests.sample_tasks.add"
PATIENT = "tests.sample_tasks.patient"


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recording:
    """The real transport, noting each send of events (one list of events per call)."""

    def __init__(self, transport: Transport, signer: Signer) -> None:
        self.transport = transport
        self.signer = signer
        self.sends: list[list[Event]] = []
        self._lock = threading.Lock()

    def emit(self, channel: str, raw_events: Sequence[bytes]) -> None:
        with self._lock:
            self.sends.append([decode_event(self.signer, raw)[0] for raw in raw_events])
        self.transport.emit(channel, raw_events)

    def kinds(self, index: int) -> list[str]:
        with self._lock:
            return [e.type.value for e in self.sends[index]]

    def count(self) -> int:
        with self._lock:
            return len(self.sends)


class Seen:
    """An ``on_event`` callback that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def kinds(self) -> list[str]:
        with self.lock:
            return [e.type.value for e in self.events]

    def wait_for(self, kind: EventType, timeout: float = 15.0) -> None:
        wait_until(lambda: kind.value in self.kinds(), timeout, f"a {kind.value} event")


@pytest.fixture
def outbox(app: App) -> Any:
    """A worker's outbox on the test's broker, on a clock of the test's, with its sends noted."""
    transport = open_broker(app.settings, app.settings.broker_url or "")
    recording = Recording(transport, app.signer)
    clock = Clock()
    box = Outbox(recording, app.signer, clock=clock)  # type: ignore[arg-type]
    yield box, recording, clock
    transport.close()


@pytest.fixture
def patient_outbox(app: App) -> Any:
    """An outbox whose tasks announce themselves only after a minute."""
    transport = open_broker(app.settings, app.settings.broker_url or "")
    recording = Recording(transport, app.signer)
    yield Outbox(recording, app.signer, started_after=60.0), recording  # type: ignore[arg-type]
    transport.close()


def following(app: App) -> tuple[TaskHandle, Seen]:
    """A handle the client's listener feeds for a task id of the test's, and its events."""
    handle = app.expect(uuid.uuid4().hex, "outbox-test")
    seen = Seen()
    handle.on_event(seen)
    return handle, seen


def run_of(app: App) -> tuple[str, None]:
    """What a worker's events name for a task that ``app`` expects (a chain's later step)."""
    return app.settings.key_prefix, None


def final(app: App, recording: Recording, handle: TaskHandle, seq: int) -> None:
    """Send the task's final event as the child does, after :meth:`Outbox.end`."""
    event = Event(EventType.SUCCESS, handle.id, seq, {"worker": "w"}, run=run_of(app))
    recording.transport.emit(app.channel, [app.signer.seal(event.to_header())])


def test_the_first_event_goes_at_once_a_burst_waits_for_the_cap_and_goes_as_one(
    app: App, outbox: Any
) -> None:
    box, recording, clock = outbox
    handle, seen = following(app)
    box.begin(handle.id, app.channel, {"worker": "w", "pid": 1}, run=run_of(app))
    # The clock stands still: only a leading edge can send this.
    wait_until(lambda: recording.count() == 1, 10, "the started event")
    assert recording.kinds(0) == ["started"]
    seen.wait_for(EventType.STARTED)

    for i in range(1, 101):
        box.write(EventType.STDOUT, f"line {i}\n")
        box.emit("progress", {"done": i, "total": 100})
    box.emit("display", {"data": {"text/plain": "shown"}, "metadata": {}})
    box.write(EventType.STDOUT, "after\n")
    threading.Event().wait(20 * CAP_SECONDS)  # in real time: still within the cap
    assert recording.count() == 1, "a burst within the cap must wait for its end"

    clock.advance(CAP_SECONDS)
    wait_until(lambda: recording.count() == 2, 10, "the burst, at the cap's end")
    # One send: the text concatenated in order, the display in its place (all packed in
    # one event), and of the hundred progress reports only the latest.
    assert recording.kinds(1) == ["output", "progress"]
    packed, progress = recording.sends[1]
    text, _, after = packed.parts()
    assert [part.type.value for part in packed.parts()] == ["stdout", "display", "stdout"]
    assert text.data["text"] == "".join(f"line {i}\n" for i in range(1, 101))
    assert after.data["text"] == "after\n"
    assert progress.data["done"] == 100

    # The task ends within the cap of that send: what it left goes at once, and then
    # its final event, numbered after everything else.
    box.emit("progress", {"done": 101, "total": 101})
    box.write(EventType.STDERR, "last words\n")
    seq = box.end()
    assert recording.count() == 3
    assert recording.kinds(2) == ["stderr", "progress"]
    sent = [e.seq for batch in recording.sends for e in batch]
    assert sent == sorted(sent)
    assert seq > sent[-1]
    final(app, recording, handle, seq)
    assert handle.get(timeout=10) is None
    wait_until(lambda: "success" in seen.kinds(), 10, "the final event's callback")
    assert seen.kinds() == [
        "started",
        "stdout",
        "display",
        "stdout",
        "progress",
        "stderr",
        "progress",
        "success",
    ]
    assert handle.stdout == "".join(f"line {i}\n" for i in range(1, 101)) + "after\n"
    assert handle.progress is not None and handle.progress.done == 101


def test_after_a_quiet_spell_the_next_event_goes_at_once(app: App, outbox: Any) -> None:
    box, recording, clock = outbox
    handle, seen = following(app)
    box.begin(handle.id, app.channel, {"worker": "w", "pid": 1}, run=run_of(app))
    wait_until(lambda: recording.count() == 1, 10, "the started event")
    for done in (1, 2, 3):
        clock.advance(CAP_SECONDS)  # quiet for a whole cap
        box.emit("progress", {"done": done, "total": 3})
        # The clock stands still again: this one too is a leading edge.
        wait_until(lambda n=done: recording.count() == n + 1, 10, f"progress {done}")
        assert recording.kinds(done) == ["progress"]
    seen.wait_for(EventType.PROGRESS)
    wait_until(lambda: handle.progress is not None and handle.progress.done == 3, 10, "progress")
    final(app, recording, handle, box.end())
    handle.get(timeout=10)


def test_each_task_has_a_cap_of_its_own(app: App, outbox: Any) -> None:
    """A task's STARTED never waits for, nor is dropped by, what the task before sent."""
    box, recording, _clock = outbox
    for task in range(3):
        handle, seen = following(app)
        box.begin(
            handle.id, app.channel, {"worker": "w", "pid": 1}, run=run_of(app), first_seq=task * 10
        )
        # The clock never moves: each task's STARTED goes out at once all the same.
        seen.wait_for(EventType.STARTED)
        box.emit("progress", {"done": 1, "total": 1})
        final(app, recording, handle, box.end())
        handle.get(timeout=10)
        wait_until(lambda s=seen: "success" in s.kinds(), 10, "the final event's callback")
        assert seen.kinds() == ["started", "progress", "success"]


def test_on_event_sees_started_and_the_final_event_of_a_task_that_ends_at_once(
    app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    for _ in range(3):
        seen = Seen()
        handle = app.send_task(ADD, (2, 3), on_event=seen)
        assert handle.get(timeout=15) == 5
        seen.wait_for(EventType.SUCCESS)
        assert seen.kinds() == ["started", "success"]
        started, done = seen.events
        assert started.data["worker"] == done.data["worker"]
        assert started.timestamp <= done.timestamp


def test_on_event_on_a_signature_and_a_function_sent_by_value(
    app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()

    @app.task
    def count(n: int) -> int:
        import nbtask

        for i in range(n):
            print(i)
            nbtask.progress(i + 1, n)
        return n

    seen = Seen()
    assert count.s(3).apply_async(on_event=seen).get(timeout=15) == 3
    seen.wait_for(EventType.SUCCESS)
    kinds = seen.kinds()
    assert kinds[0] == "started"
    assert kinds[-1] == "success"
    assert set(kinds[1:-1]) <= {"stdout", "progress"}
    text = "".join(e.data["text"] for e in seen.events if e.type is EventType.STDOUT)
    assert text == "0\n1\n2\n"
    seqs = [e.seq for e in seen.events if e.seq]
    assert seqs == sorted(seqs)


def test_a_callback_that_raises_stops_neither_the_handle_nor_other_tasks(
    app: App, start_worker: Callable[..., WorkerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    start_worker()

    def broken(event: Event) -> None:
        raise RuntimeError(f"callback broke on {event.type.value}")

    caplog.set_level(logging.ERROR, logger="nbtask")
    after = Seen()
    failing = app.send_task(CHATTY, (3,), on_event=broken)
    failing.on_event(after)  # a second callback on the same handle
    others = [Seen() for _ in range(3)]
    handles = [app.send_task(CHATTY, (2,), on_event=seen) for seen in others]

    assert failing.get(timeout=15) == 3
    assert [h.get(timeout=15) for h in handles] == [2, 2, 2]
    after.wait_for(EventType.SUCCESS)
    # Attached after sending, it sees the events from then on (maybe not STARTED), in order.
    assert after.kinds()[-1] == "success"
    for seen in others:
        seen.wait_for(EventType.SUCCESS)
        assert seen.kinds()[0] == "started"
    assert failing.state is State.SUCCESS
    assert "line 2\n" in failing.stdout
    broke = [r for r in caplog.records if "on_event callback" in r.getMessage()]
    assert broke and all(failing.id in r.getMessage() for r in broke)
    # The listener lives on: a task sent afterwards is followed as before.
    later = Seen()
    assert app.send_task(ADD, (1, 1), on_event=later).get(timeout=15) == 2
    later.wait_for(EventType.SUCCESS)


def test_a_skipped_started_is_made_from_the_final_event_once() -> None:
    """Client side alone: the worker skips STARTED for a task that ends before it is sent."""
    seen = Seen()
    handle = TaskHandle(None, "t1", "quick")
    handle.on_event(seen)
    whoami = {"worker": "host", "pid": 7, "started_at": 123.5}
    handle.apply(Event(EventType.SUCCESS, "t1", 3, {**whoami, "runtime": 0.0}), 42)
    assert seen.kinds() == ["started", "success"]
    assert seen.events[0].timestamp == 123.5
    assert dict(seen.events[0].data) == whoami
    assert handle.result(0) == 42

    # A STARTED that did arrive is not repeated.
    seen = Seen()
    handle = TaskHandle(None, "t2", "quick")
    handle.on_event(seen)
    handle.apply(Event(EventType.STARTED, "t2", 1, whoami))
    handle.apply(Event(EventType.SUCCESS, "t2", 2, whoami))
    assert seen.kinds() == ["started", "success"]

    # A final event without ``started_at`` (the task never ran: revoked while queued)
    # gets none.
    seen = Seen()
    handle = TaskHandle(None, "t3", "quick")
    handle.on_event(seen)
    handle.apply(Event(EventType.REVOKED, "t3", 5, {"reason": "revoked"}))
    assert seen.kinds() == ["revoked"]


def test_a_skipped_started_is_made_from_the_retry_that_ended_its_run() -> None:
    """Client side alone: a run that ended in a retry before its STARTED went out."""
    seen = Seen()
    handle = TaskHandle(None, "t1", "flaky")
    handle.on_event(seen)
    whoami = {"worker": "host", "pid": 7}
    first = {**whoami, "started_at": 100.0, "reason": "not yet", "retries": 1, "eta": 102.0}
    handle.apply(Event(EventType.RETRY, "t1", 2, first))
    handle.apply(Event(EventType.RETRY, "t1", 2, first))  # read twice: applied once
    # The second run's STARTED did arrive: none is made from its retry.
    handle.apply(Event(EventType.STARTED, "t1", 1_000_001, {**whoami, "started_at": 102.5}))
    second = {**first, "started_at": 102.5, "retries": 2}
    handle.apply(Event(EventType.RETRY, "t1", 1_000_002, second))
    assert seen.kinds() == ["started", "retry", "started", "retry"]
    assert seen.events[0].timestamp == 100.0
    assert dict(seen.events[0].data) == {**whoami, "started_at": 100.0}
    assert handle.state is State.RETRY and not handle.running()


def test_a_run_whose_started_and_retry_went_unread_still_gives_started_first() -> None:
    """Client side alone: after an earlier run's STARTED, its RETRY never read (trimmed)."""
    seen = Seen()
    handle = TaskHandle(None, "t1", "flaky")
    handle.on_event(seen)
    whoami = {"worker": "host", "pid": 7}
    handle.apply(Event(EventType.STARTED, "t1", 1, {**whoami, "started_at": 100.0}))
    # The first run's RETRY and the second run's STARTED went unread.
    second = {**whoami, "started_at": 102.5, "reason": "not yet", "retries": 2, "eta": 104.0}
    handle.apply(Event(EventType.RETRY, "t1", 1_000_002, second))
    assert seen.kinds() == ["started", "started", "retry"]  # (before: started, retry)
    assert seen.events[1].timestamp == 102.5


def test_a_handle_is_done_when_its_future_is() -> None:
    """Client side alone: ``done()``, read without the Future's lock, is the Future's."""
    pending, running, ended, failed, cancelled = (
        TaskHandle(None, f"t{n}", "quick") for n in range(5)
    )
    running.apply(Event(EventType.STARTED, "t1", 1, {}))
    ended.apply(Event(EventType.SUCCESS, "t2", 2, {}), 42)
    failed.apply(Event(EventType.FAILURE, "t3", 2, {"ename": "KeyError", "evalue": "'k'"}))
    concurrent.futures.Future.cancel(cancelled)
    handles = [pending, running, ended, failed, cancelled]
    assert [h.done() for h in handles] == [False, False, True, True, True]
    assert [h.done() for h in handles] == [concurrent.futures.Future.done(h) for h in handles]


def test_a_task_that_ends_before_its_started_is_due_sends_none_and_a_longer_one_does(
    app: App, patient_outbox: Any, outbox: Any
) -> None:
    box, recording = patient_outbox
    handle, seen = following(app)
    box.begin(handle.id, app.channel, {"worker": "w", "pid": 1}, run=run_of(app))
    threading.Event().wait(0.2)
    seq = box.end()
    assert recording.count() == 0, "a task that ended before its started was due sent it"
    # The child's final event says when the task started; the client makes STARTED from it.
    data = {"worker": "w", "started_at": time.time()}
    ended = Event(EventType.SUCCESS, handle.id, seq, data, run=run_of(app))
    recording.transport.emit(app.channel, [app.signer.seal(ended.to_header())])
    handle.result(timeout=10)
    assert seen.kinds() == ["started", "success"]

    quick, quick_recording, _clock = outbox  # the default: due after half a millisecond
    other, other_seen = following(app)
    quick.begin(other.id, app.channel, {"worker": "w", "pid": 1}, run=run_of(app))
    wait_until(lambda: quick_recording.count() == 1, 10, "the started event, once due")
    assert quick_recording.kinds(0) == ["started"]
    other_seen.wait_for(EventType.STARTED)


def counted_disarms(box: Outbox, monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """The calls of ``box``'s alarm's disarm() from now on (it still disarms)."""
    calls: list[None] = []
    disarm = box._alarm.disarm

    def counted() -> None:
        calls.append(None)
        disarm()

    monkeypatch.setattr(box._alarm, "disarm", counted)
    return calls


def test_an_alarm_that_went_off_is_not_disarmed_and_the_next_task_still_announces_itself(
    app: App, outbox: Any, patient_outbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    box, recording, _clock = outbox  # the default: due after half a millisecond
    if not box._alarm.available:
        pytest.skip("no timerfd here: the outbox rings its bell at once instead")
    disarms = counted_disarms(box, monkeypatch)
    for sent in (1, 2):
        handle, seen = following(app)
        box.begin(handle.id, app.channel, {"worker": "w", "pid": 1}, run=run_of(app))
        wait_until(lambda n=sent: recording.count() == n, 10, "the started event, once due")
        box.end()
        seen.wait_for(EventType.STARTED)
    assert disarms == [], "an alarm that had gone off (spent) was disarmed"

    patient, patient_recording = patient_outbox  # due after a minute
    patient_disarms = counted_disarms(patient, monkeypatch)
    patient.begin(uuid.uuid4().hex, app.channel, {"worker": "w", "pid": 1}, run=run_of(app))
    patient.end()
    assert patient_disarms == [None], "the alarm of a task that ended before it was due"
    assert patient_recording.count() == 0


def test_a_task_that_says_when_it_announces_itself_sends_no_started_before(
    app: App, outbox: Any
) -> None:
    box, recording, _clock = outbox  # the worker's own: due after half a millisecond
    if not box._alarm.available:
        pytest.skip("no timerfd here: the outbox rings its bell at once instead")
    handle, _seen = following(app)
    box.begin(handle.id, app.channel, {"worker": "w"}, run=run_of(app), started_after=60.0)
    time.sleep(0.05)  # a hundred times the worker's own delay
    box.end()
    assert recording.count() == 0, "a started event went out before the task's own delay"

    handle, seen = following(app)  # at once: a delay of nothing still goes off
    box.begin(handle.id, app.channel, {"worker": "w"}, run=run_of(app), started_after=0.0)
    wait_until(lambda: recording.count() == 1, 10, "the started event, due at once")
    box.end()
    seen.wait_for(EventType.STARTED)


def test_a_task_run_past_the_workers_delay_but_not_its_own_sends_no_started(
    app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    seen = Seen()
    handle = app.send_task(PATIENT, (0.05,), on_event=seen)  # a hundred times the worker's
    assert handle.get(timeout=15) == 0.05
    seen.wait_for(EventType.SUCCESS)
    assert seen.kinds() == ["started", "success"]
    # A started event the worker sent has a number of its own; one made from the end, 0.
    assert seen.events[0].seq == 0, "the worker sent a started event before the task's delay"
