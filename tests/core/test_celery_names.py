"""Celery's ``AsyncResult`` and app names: aliases with Celery's meanings, or one error
saying what nbtask offers instead."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

import nbtask
from nbtask import App, State, chain, group

pytestmark = pytest.mark.brokers

EXPLODE = "tests.sample_tasks.explode"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def test_a_handle_answers_to_celerys_result_names(app: App, start_worker) -> None:
    start_worker()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    h = add.delay(2, 3)
    assert h.wait(timeout=10) == 5
    assert h.status == "SUCCESS" and type(h.status) is str
    assert h.task_id == h.id
    assert h.traceback is None
    assert h.result() == 5  # a method: it is concurrent.futures.Future.result
    assert h.info != 5 and "worker" in h.info  # who ran it, not the return value (Celery's)
    again = app.AsyncResult(h.id)  # app.handle(id): from the store once the task ended
    assert (again.task_id, again.get(timeout=10), again.status) == (h.id, 5, "SUCCESS")
    with pytest.raises(nbtask.TaskNotFound):  # Celery's would read PENDING forever
        app.AsyncResult(uuid.uuid4().hex)

    failed = app.send_task(EXPLODE, ("broken on purpose",))
    with pytest.raises(ValueError, match="broken on purpose"):
        failed.wait(timeout=10)
    assert isinstance(failed.wait(10, False), ValueError)  # Celery's wait(timeout, propagate)
    assert failed.status == "FAILURE"
    text = failed.traceback
    assert text is not None and "_explode_helper" in text and "broken on purpose" in text


def test_a_handle_equals_its_id_and_hashes_as_it_as_celerys_async_result(
    app: App, start_worker
) -> None:
    start_worker()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    h, other = add.delay(2, 3), add.delay(1, 1)
    assert h == h.id and h.id == h and h != other and h != other.id
    assert hash(h) == hash(h.id) and {h.id: "found"}[h] == "found"
    # str() is the id, as Celery's str(AsyncResult): stored with json, it is the id.
    assert str(h) == h.id and f"{h}" == h.id
    assert json.loads(json.dumps({"id": str(h)})) == {"id": h.id}
    assert repr(h).startswith(f"<TaskHandle {add.name}[{h.id}] ")
    assert h.get(timeout=10) == 5 and other.get(timeout=10) == 2
    again = app.AsyncResult(h.id)  # another handle of the same task
    assert again is not h and again == h and len({h, again, h.id}) == 1
    assert h != 5 and h != None  # noqa: E711 - neither an id nor a handle


def test_failed_is_celerys_a_revoked_task_and_a_group_with_one_have_not_failed(
    app: App, start_worker, steps: tuple[Any, ...]
) -> None:
    """As Celery's, ``failed()`` is a ``FAILURE`` (a lost worker, Celery's
    ``WorkerLostError``, is one: see ``test_lost_outcomes.py``), not a revoke."""
    add, _, fail, _ = steps
    revoked = app.send_task(WAIT_FOR_FILE, ("-", "-"))
    members = group([add.s(1, 1), add.s(2, 2)]).delay()
    assert revoked.revoke() is True and members.handles[1].revoke() is True
    start_worker()
    with pytest.raises(nbtask.TaskRevoked):
        revoked.get(timeout=10)
    assert revoked.ready() and not revoked.failed() and not revoked.successful()
    two, gone = members.get(timeout=10, propagate=False)
    assert two == 2 and isinstance(gone, nbtask.TaskRevoked)
    assert members.ready() and not members.failed() and not members.successful()

    failing = group([add.s(1, 1), fail.s(0)]).delay()
    failing.get(timeout=10, propagate=False)
    assert failing.handles[1].failed() and failing.failed() and not failing.successful()


def test_revoke_on_a_handle_and_app_control_revoke_are_app_revoke(
    app: App, start_worker, tmp_path: Path
) -> None:
    queued = [app.send_task(WAIT_FOR_FILE, ("-", "-")) for _ in range(4)]
    assert queued[0].revoke() is True
    assert app.control.revoke(queued[1].id) is True
    assert app.control.revoke([queued[2].id, queued[3].id]) is True
    for h in queued:
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=5)
        assert h.status == "REVOKED"

    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)))
    wait_until(marker.exists, 10, "the task to start")
    # Without terminate, as in Celery, a running task runs on.
    assert running.revoke() is False
    assert app.control.revoke(running.id) is False
    go.touch()
    assert isinstance(running.get(timeout=10), int)

    marker.unlink()
    go.unlink()
    stopped = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 30.0))
    wait_until(marker.exists, 10, "the task to start")
    wait_until(lambda: stopped.state is State.STARTED, 10, "the task to show as started")
    assert stopped.revoke(terminate=True, grace=1.0) is True
    with pytest.raises(nbtask.TaskRevoked):
        stopped.get(timeout=10)
    assert stopped.revoke() is False  # ended: nothing to revoke


@pytest.mark.brokers("redis")
def test_celerys_names_nbtask_has_no_counterpart_for_say_what_to_do_instead(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    h = add.delay(1, 2)
    expected = {
        "forget": r"forget\(\) is Celery's; .*result_ttl",
        "children": r"children is Celery's; .*app\.handle\(id\)",
        "collect": r"collect\(\) is Celery's; .*\.parent",
        "then": r"then\(\) is Celery's; .*add_done_callback",
    }
    for name, message in expected.items():
        with pytest.raises(AttributeError, match=message):
            getattr(h, name)
        assert not hasattr(h, name)
    with pytest.raises(AttributeError, match=r"App\(\.\.\.\) keyword arguments or NBTASK_\*"):
        app.conf  # noqa: B018
    assert not hasattr(app, "conf")
    with pytest.raises(AttributeError, match=r"has only revoke\(\).*app\.workers\(\)"):
        app.control.inspect()


@pytest.mark.brokers("redis")
def test_more_celery_names_say_what_to_do_instead(app: App) -> None:
    """A group's save() and forget(), app.GroupResult, get(on_message=), self.backend.

    Before: bare errors, "'GroupHandle' object has no attribute 'save'", "get() got an
    unexpected keyword argument 'on_message'", "'uses_backend' object has no attribute
    'backend'"."""

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(bind=True)
    def uses_backend(self: nbtask.Task) -> str:
        try:
            self.backend.store_result(self.request.id, 1, "SUCCESS")
        except AttributeError as exc:
            return str(exc)
        return "stored"

    gh = group([add.s(1, 1), add.s(2, 2)]).delay()
    gathered = r"GroupHandle\(\[app\.handle\(i\) for i in ids\], group_id\)"
    with pytest.raises(AttributeError, match=rf"GroupHandle\.save\(\) is Celery's; .*{gathered}"):
        gh.save()
    with pytest.raises(AttributeError, match=r"GroupHandle\.forget\(\) is Celery's; .*result_ttl"):
        gh.forget()
    with pytest.raises(AttributeError, match=rf"app\.GroupResult is Celery's; .*{gathered}"):
        app.GroupResult(gh.id, gh.results)
    assert not hasattr(gh, "save") and not hasattr(app, "GroupResult")
    with pytest.raises(nbtask.ConfigurationError, match=r"on_message.*h\.on_event\(fn\)"):
        gh.handles[0].get(timeout=1, on_message=print)
    said = uses_backend.apply().get()
    assert said.startswith("task.backend is Celery's; nbtask has no counterpart"), said
    assert "self.update_state(" in said and "app.handle(id)" in said


def test_a_handle_keeps_the_future_contract_while_running_and_once_cancelled(
    app: App, start_worker, tmp_path: Path
) -> None:
    """``running()`` while a worker runs it; a revoked handle is ``cancelled()``, and its
    ``exception()`` and ``result()`` raise ``TaskRevoked``, a ``CancelledError``."""
    queued = app.send_task(WAIT_FOR_FILE, ("-", "-"))
    assert not queued.running() and not queued.cancelled()
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done() and not queued.running()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.exception(0)
    with pytest.raises(nbtask.TaskRevoked):
        queued.result(0)
    assert isinstance(queued.error, nbtask.TaskRevoked)  # returned, not raised
    assert isinstance(queued.get(0, propagate=False), nbtask.TaskRevoked)

    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go), 30.0))
    wait_until(lambda: running.state is State.STARTED, 10, "the task to show as started")
    assert running.running() and not running.done() and not running.cancelled()
    assert running.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        running.result(timeout=15)
    assert running.state is State.REVOKED and running.cancelled() and not running.running()
    with pytest.raises(concurrent.futures.CancelledError):
        running.exception()

    async def awaited() -> None:
        await asyncio.wrap_future(running)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(awaited())

    finished = app.send_task(EXPLODE, ("broken",))
    assert isinstance(finished.exception(timeout=15), ValueError)  # a failure is returned
    assert not finished.cancelled() and not finished.running()


@pytest.mark.brokers("redis")
def test_celerys_spellings_nbtask_does_not_have_say_the_celery_name_and_nbtasks_way(
    app: App,
) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def tsum(numbers: list[int]) -> int:
        return sum(numbers)

    calls = nbtask.group([add.s(1, 1), add.s(2, 2)])
    with pytest.raises(nbtask.ConfigurationError, match=r"Celery's chord.*\.delay\(\)\.get\(\)"):
        calls | tsum.s()  # type: ignore[operator]
    with pytest.raises(nbtask.ConfigurationError, match=r"Celery's chord"):
        nbtask.chord([add.s(1, 1)])(tsum.s())  # type: ignore[operator]
    expected = {
        "map": r"map\(items\) is Celery's; .*add\.delay_many",
        "starmap": r"starmap\(items\) is Celery's; .*add\.delay_many\(items\)",
        "chunks": r"chunks\(items, n\) is Celery's; .*group\(add_chunk",
        "replace": r"replace\(sig\) is Celery's; .*return add\.run\(x, 100\)",
    }
    for name, message in expected.items():
        with pytest.raises(AttributeError, match=message):
            getattr(add, name)
        assert not hasattr(add, name)

    h = add.delay(1, 2)
    for name in ("args", "kwargs"):
        with pytest.raises(AttributeError, match=rf"{name} is Celery's; .*self\.request\.args"):
            getattr(h, name)


@pytest.mark.brokers("redis")
def test_nested_canvases_are_refused_saying_what_nbtask_does_instead(app: App) -> None:
    """A group inside a chain, a chain or a group inside a group: each error says nbtask's
    way. Before, "only signatures can be chained, got Group(...)" and "group() takes
    signatures", as if a signature were all that was missing."""

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def tsum(numbers: list[int]) -> int:
        return sum(numbers)

    calls = nbtask.group([add.s(1, 1), add.s(2, 2)])
    chord_way = r"Celery's chord.*task\.delay\(group\(\[\.\.\.\]\)\.delay\(\)\.get\(\)\)"
    with pytest.raises(nbtask.ConfigurationError, match=chord_way):
        nbtask.chain(calls, tsum.s())
    after_a_step = r"group after a chain's step.*group\(\[\.\.\.\]\)\.delay\(task\.delay\(\)"
    with pytest.raises(nbtask.ConfigurationError, match=after_a_step):
        nbtask.chain(add.s(1, 1), calls)
    with pytest.raises(nbtask.ConfigurationError, match=after_a_step):
        add.s(1, 1) | calls  # type: ignore[operator]
    with pytest.raises(nbtask.ConfigurationError, match=r"chain in a group.*Send each chain"):
        nbtask.group(add.s(1, 1) | add.s(1), add.s(2, 2) | add.s(2))
    with pytest.raises(nbtask.ConfigurationError, match=r"group in a group.*in one group"):
        nbtask.group([calls, add.s(1, 1)])
    # Anything else still says how to make a signature, naming what it got.
    with pytest.raises(nbtask.ConfigurationError, match=r"only signatures can be chained, got 3"):
        nbtask.chain(add.s(1, 1), 3)  # type: ignore[arg-type]
    with pytest.raises(nbtask.ConfigurationError, match=r"group\(\) takes signatures.*got 3"):
        nbtask.group(add.s(1, 1), 3)  # type: ignore[arg-type]


def test_date_done_is_when_the_task_ended(app: App, start_worker) -> None:
    start_worker()
    h = app.send_task("tests.sample_tasks.add", (2, 3))
    assert h.date_done is None or h.done()
    assert h.get(timeout=15) == 5
    done = h.date_done
    assert isinstance(done, dt.datetime) and done.tzinfo is not None
    assert done.timestamp() == pytest.approx(h.finished_at, abs=1e-5)  # microseconds


@pytest.mark.parametrize(
    ("name", "args"), [("tests.sample_tasks.add", (2, 3)), ("tests.sample_tasks.explode", ("x",))]
)
def test_the_stored_record_ends_when_the_handle_says(
    app: App, start_worker, name: str, args: tuple[object, ...]
) -> None:
    # One time, the ending event's: `nbtask inspect` (the record) and `h.date_done` (the
    # event) must not disagree by however long the worker took between the two.
    start_worker()
    h = app.send_task(name, args)
    h.wait(timeout=15, propagate=False)
    record = app.store.get_record(h.id)
    assert record is not None and record.finished_at == h.finished_at is not None


def test_celerys_call_spellings_send_and_wait_as_nbtasks_do(app: App, start_worker) -> None:
    start_worker()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    h = add.delay(2, 3)
    # get()'s options for Celery's polling backends are taken and unused.
    assert h.get(timeout=10, interval=0.5, no_ack=False, follow_parents=False) == 5
    assert add.signature((9,), {"y": 1}).delay().get(timeout=10) == 10
    later = add.signature((1, 1), countdown=0.2, immutable=True)
    assert later.immutable and later.options == {"countdown": 0.2}
    assert group([add.s(1, 1), add.s(2, 2)])().get(timeout=10) == [2, 4]
    assert chain(add.s(1, 1), add.s(10))().get(timeout=10) == 12
    assert (add.s(2) | add.s(3))(4).get(timeout=10) == 9  # extra arguments go first


def test_replace_in_a_running_task_says_celerys_name_and_nbtasks_way(
    app: App, start_worker
) -> None:
    # Before, a bare AttributeError naming the task's class ("'replacer' object has no ...").
    start_worker()

    @app.task(bind=True)
    def replacer(self: nbtask.Task, x: int) -> str:
        try:
            self.replace(self.s(x))
        except AttributeError as exc:
            return str(exc)
        return "replaced"

    said = replacer.delay(1).get(timeout=15)
    assert said.startswith("task.replace(sig) is Celery's; nbtask has no counterpart"), said
