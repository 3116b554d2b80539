"""Canvas: signatures, link/link_error, chains, groups, and tasks that
send or wait for other tasks."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import remote_of, wait_for_housekeeping, wait_until

from nbtask import App, State, Task, TaskNotFound, chain, group
from nbtask.client import event_reads
from nbtask.client.listener import Listener
from nbtask.wire.events import EventType
from tests.celery_tasks import read_records

pytestmark = pytest.mark.brokers


# Signatures -----------------------------------------------------------------------------------
def test_signatures_partial_and_immutable(app: App, start_worker, steps: tuple[Any, ...]) -> None:
    start_worker()
    add, mul, _, _ = steps
    sig = add.s(2)
    assert (sig.task, sig.args, sig.immutable) == (add, (2,), False)
    # Arguments given when sending come first, as in Celery: add.s(2).delay(8) -> add(8, 2).
    assert sig.delay(8).get(timeout=10) == 10
    assert mul.s(3).apply_async((5,)).get(timeout=10) == 15
    # An immutable signature ignores extra arguments.
    assert add.si(1, 2).delay(100).get(timeout=10) == 3
    assert add.s(y=4).delay(1).get(timeout=10) == 5
    assert "add" in repr(add.si(1, 2))
    # Options set on a signature are used when it is sent.
    task_id = uuid.uuid4().hex
    h = add.s(1, 1).set(task_id=task_id).delay()
    assert h.id == task_id
    assert h.get(timeout=10) == 2


def test_calling_a_signature_runs_the_task_here_with_its_arguments_merged(
    app: App, steps: tuple[Any, ...]
) -> None:
    add, mul, _, _ = steps
    # Celery's order: the call's arguments first, then the signature's.
    assert add.s(2)(8) == 10
    assert mul.s(3)(5) == 15
    assert add.si(1, 2)(100) == 3  # immutable: the call's arguments are ignored
    assert add.s(y=4)(1) == 5


# link / link_error ----------------------------------------------------------------------------
def test_link_gets_the_result(app: App, start_worker, steps: tuple[Any, ...]) -> None:
    start_worker()
    add, mul, _, _ = steps
    link_id = uuid.uuid4().hex
    follow = app.expect(link_id, mul.name)
    h = add.apply_async((2, 3), link=mul.s(10).set(task_id=link_id))
    assert h.get(timeout=10) == 5
    assert follow.get(timeout=10) == 50


def test_link_error_gets_the_failed_task_id(
    app: App, start_worker, tmp_path: Path, steps: tuple[Any, ...]
) -> None:
    start_worker()
    add, _, fail, note = steps
    errback_id, never_id = uuid.uuid4().hex, uuid.uuid4().hex
    ledger = tmp_path / "ledger"
    errback = app.expect(errback_id, note.name)
    h = fail.apply_async(
        (1,),
        link=note.s(str(ledger)).set(task_id=never_id),
        link_error=note.s(str(ledger)).set(task_id=errback_id),
    )
    with pytest.raises(ValueError):
        h.get(timeout=10)
    assert errback.get(timeout=10) == h.id
    assert [rec["value"] for rec in read_records(ledger)] == [h.id]  # the link never ran

    # On success, link_error is not sent.
    ok = add.apply_async((1, 1), link_error=note.s(str(ledger)))
    assert ok.get(timeout=10) == 2
    wait_for_housekeeping(app)
    assert len(read_records(ledger)) == 1


def test_an_errback_taking_request_exc_and_traceback_gets_them_as_celerys(
    app: App, start_worker
) -> None:
    # Celery's documented errback, error_handler(request, exc, traceback): before, the worker
    # sent it the failed task's id alone and it failed with a TypeError.
    start_worker()

    class Unpicklable(KeyError):
        def __init__(self, word: str) -> None:
            import threading

            super().__init__(f"no {word}")
            self.lock = threading.Lock()  # does not pickle: left out, the rest travels

    @app.task
    def boom(word: str, *, plain: bool = True) -> None:
        raise KeyError(f"no {word}") if plain else Unpicklable(word)

    @app.task
    def error_handler(request: Any, exc: BaseException, traceback: str) -> list[Any]:
        return [request.id, request.args, request.kwargs, type(exc).__name__, exc.args, traceback]

    for plain in (True, False):
        errback_id = uuid.uuid4().hex
        errback = app.expect(errback_id, error_handler.name)
        h = boom.apply_async(
            ("le",), {"plain": plain}, link_error=error_handler.s().set(task_id=errback_id)
        )
        with pytest.raises(KeyError):
            h.get(timeout=10)
        task_id, args, kwargs, kind, exc_args, traceback = errback.get(timeout=10)
        assert (task_id, args, kwargs, exc_args) == (h.id, ("le",), {"plain": plain}, ("no le",))
        assert kind == ("KeyError" if plain else "Unpicklable")
        assert traceback.startswith("Traceback") and "no le" in traceback


# Chains ---------------------------------------------------------------------------------------
def test_chain_of_three_returns_the_last_result_with_parents(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    start_worker()
    add, mul, _, _ = steps
    last = (add.s(1, 2) | add.s(3) | mul.s(10)).delay()
    assert last.get(timeout=15) == 60
    second, first = last.parent, last.parent.parent
    assert second is not None and first is not None
    assert first.parent is None
    assert first.get(timeout=10) == 3
    assert second.get(timeout=10) == 6
    assert [h.state for h in (first, second, last)] == [State.SUCCESS] * 3
    assert len({first.id, second.id, last.id}) == 3

    # chain() is the same; si() ignores the previous result; arguments go to the first step.
    assert chain(add.s(1), add.si(10, 10), mul.s(2)).delay(5).get(timeout=15) == 40


def test_chain_with_a_failing_middle_step(
    app: App, start_worker, tmp_path: Path, steps: tuple[Any, ...]
) -> None:
    start_worker()
    add, _, fail, note = steps
    ledger = tmp_path / "ledger"
    last = (add.s(1, 1) | fail.s() | note.s(str(ledger))).delay()
    with pytest.raises(ValueError) as info:
        last.get(timeout=15)
    assert remote_of(info.value).ename == "ValueError"
    assert "middle step failed" in remote_of(info.value).evalue
    assert last.state is State.FAILURE
    middle, first = last.parent, last.parent.parent
    assert first.get(timeout=10) == 2
    with pytest.raises(ValueError) as middle_info:
        middle.get(timeout=10)
    assert remote_of(middle_info.value).ename == "ValueError"
    # The last step was never sent, so it never ran; its record says FAILURE too.
    assert app.store.get_record(last.id).state == "FAILURE"
    wait_for_housekeeping(app)
    assert read_records(ledger) == []


def test_a_chain_steps_own_links_and_errbacks_are_kept_beside_the_next_step(
    app: App, start_worker, tmp_path: Path, steps: tuple[Any, ...]
) -> None:
    start_worker()
    add, _, fail, note = steps
    ledger = tmp_path / "ledger"
    first_link, second_link, errback = (uuid.uuid4().hex for _ in range(3))
    followers = [app.expect(i, note.name) for i in (first_link, second_link, errback)]
    last = (
        add.s(1, 1).set(link=note.s(str(ledger)).set(task_id=first_link))
        | add.s(10).set(link=[note.s(str(ledger)).set(task_id=second_link)])
        | fail.s().set(link_error=note.s(str(ledger)).set(task_id=errback))
    ).delay()
    with pytest.raises(ValueError):
        last.get(timeout=15)
    # Each step's own link got its result, and the chain went on; the last step's errback
    # got its id, as Celery's would.
    assert [f.get(timeout=15) for f in followers] == [2, 12, last.id]
    assert sorted(str(rec["value"]) for rec in read_records(ledger)) == sorted(["2", "12", last.id])


# Groups ---------------------------------------------------------------------------------------
def test_group_get_returns_results_in_order(app: App, start_worker, steps: tuple[Any, ...]) -> None:
    start_worker(concurrency=2)
    add, mul, _, _ = steps
    g = group([add.s(i, i) for i in range(10)] + [mul.s(3, 4)])
    gh = g.delay()
    assert len(gh) == 11
    assert gh.get(timeout=15) == [2 * i for i in range(10)] + [12]
    assert gh.ready()
    assert gh.progress == 1.0
    assert gh.completed_count() == 11
    assert group([]).delay().get() == []


def test_a_group_handle_reads_like_a_task_handle(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    # Celery's GroupResult habits: get(propagate=False), iterating, successful(), failed().
    start_worker(concurrency=2)
    add, _, fail, _ = steps
    gh = group([add.s(1, 1), fail.s(0), add.s(2, 2)]).delay()
    two, failure, four = gh.get(timeout=15, propagate=False)
    assert (two, four) == (2, 4)
    assert isinstance(failure, ValueError) and str(failure) == "middle step failed"
    assert [h.state for h in gh] == [State.SUCCESS, State.FAILURE, State.SUCCESS]
    assert gh.failed() and not gh.successful()
    fine = group([add.s(1, 1)]).delay()
    assert fine.get(timeout=15) == [2]
    assert fine.successful() and not fine.failed()


def test_group_progress_and_completed_count(
    app: App, start_worker, tmp_path: Path, steps: tuple[Any, ...]
) -> None:
    start_worker(concurrency=3)
    add, _, fail, _ = steps
    marker, go = tmp_path / "marker", tmp_path / "go"

    @app.task
    def wait_for(marker: str, go: str) -> str:
        import time as t
        from pathlib import Path as P

        P(marker).write_text("waiting")
        deadline = t.monotonic() + 15
        while not P(go).exists() and t.monotonic() < deadline:
            t.sleep(0.02)
        return "released"

    try:
        gh = group([add.s(1, 1), fail.s(0), wait_for.s(str(marker), str(go))]).delay()
        wait_until(lambda: gh.handles[0].ready() and gh.handles[1].ready(), 10, "two done")
        assert gh.progress == pytest.approx(2 / 3)
        assert gh.completed_count() == 1  # the failed one finished, but not successfully
        assert not gh.ready()
        assert "2/3" in repr(gh)
    finally:
        go.touch()
    with pytest.raises(ValueError):
        gh.get(timeout=10)  # the first error met
    wait_until(gh.ready, 10, "the whole group")
    assert gh.progress == 1.0
    assert gh.completed_count() == 2
    assert gh.handles[2].result() == "released"


# Tasks that wait for, or send, other tasks ---------------------------------------------------
def test_get_inside_a_task_raises_and_points_to_chains(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    start_worker(concurrency=2)
    add, _, _, _ = steps

    @app.task
    def waits_for_subtask() -> str:
        sub = add.delay(1, 2)
        try:
            sub.get(timeout=5)
        except RuntimeError as exc:
            return str(exc)
        return "get() did not refuse"

    message = waits_for_subtask.delay().get(timeout=10)
    assert "chain" in message.lower()
    assert ".s(" in message

    @app.task
    def uncaught() -> int:
        return add.delay(1, 2).get(timeout=5)

    with pytest.raises(RuntimeError, match="Chain them instead"):
        uncaught.delay().get(timeout=10)


def test_get_inside_a_task_when_explicitly_allowed(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    # disable_sync_subtasks=False is the guide's explicit escape hatch: the wait must
    # then actually return the subtask's result.
    start_worker(concurrency=2)
    add, _, _, _ = steps

    @app.task
    def waits_anyway() -> int:
        return add.delay(20, 22).get(timeout=5, disable_sync_subtasks=False)

    assert waits_anyway.delay().get(timeout=15) == 42


def test_get_inside_a_task_applied_here_waits_as_its_caller_would(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    # apply() runs the task in this process: no worker slot blocks while it waits. Applied
    # inside a task on a worker, it still refuses.
    start_worker(concurrency=2)
    add, _, _, _ = steps

    @app.task(bind=True)
    def waits(self: Task) -> tuple[bool, int]:
        return self.request.is_eager, add.delay(1, 2).get(timeout=10)

    assert waits.apply().get() == (True, 3)

    @app.task
    def applies_on_the_worker() -> str:
        try:
            waits.apply(throw=True)
        except RuntimeError as exc:
            return str(exc)
        return "get() did not refuse"

    assert "Chain them instead" in applies_on_the_worker.delay().get(timeout=15)


def test_a_subtask_ending_while_it_is_reattached_is_not_missed(
    app: App, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its end reaches this client's listener before the new handle is registered."""
    start_worker(concurrency=2)

    @app.task
    def child() -> int:
        time.sleep(1.0)
        return 7

    @app.task
    def parent() -> str:
        return child.delay().id

    read: list[tuple[str, EventType]] = []
    decode = event_reads.decode_event

    def recording(*args: Any, **kwargs: Any) -> Any:
        event, result = decode(*args, **kwargs)
        read.append((event.task_id, event.type))
        return event, result

    monkeypatch.setattr(event_reads, "decode_event", recording)
    child_id = parent.delay().get(timeout=10)
    register = Listener.register
    its_end = (child_id, EventType.SUCCESS)

    def register_after_the_end(self: Listener, handle: Any, *args: Any, **kwargs: Any) -> None:
        # Its final event has come through this client's listener, to no handle.
        wait_until(lambda: its_end in read, 10, "the subtask's end to be read")
        register(self, handle, *args, **kwargs)

    monkeypatch.setattr(Listener, "register", register_after_the_end)
    assert app.handle(child_id).get(timeout=5) == 7


def test_subtask_sent_from_a_task_can_be_reattached(app: App, start_worker) -> None:
    start_worker(concurrency=2)

    @app.task(bind=True)
    def child(self, x: int) -> dict:
        return {"x": x * 2, "parent_id": self.request.parent_id, "root_id": self.request.root_id}

    @app.task
    def parent(x: int) -> list[str]:
        return [child.delay(x).id, child.delay(x + 1).id]

    h = parent.delay(5)
    ids = h.get(timeout=10)
    results = [app.handle(task_id).get(timeout=10) for task_id in ids]
    assert [r["x"] for r in results] == [10, 12]
    assert {r["parent_id"] for r in results} == {h.id}
    assert {r["root_id"] for r in results} == {h.id}
    assert app.handle(ids[0]).state is State.SUCCESS


def test_a_chains_later_step_not_sent_yet_says_so_when_another_process_attaches(
    app: App, settings: Any, steps: tuple[Any, ...]
) -> None:
    # No worker: the first step waits in its queue, and the later step has no record
    # until a worker sends it. Another process (a restarted kernel) asking for it is
    # told why, rather than only that the id is wrong or too old.
    add, mul, _, _ = steps
    last = (add.s(1, 2) | mul.s(10)).delay()
    with App("restarted", settings=settings) as later:
        with pytest.raises(TaskNotFound, match="a later step of a chain not sent yet"):
            later.handle(last.id)
        assert later.handle(last.parent.id).state is State.PENDING
