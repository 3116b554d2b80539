"""Routes pick a task's queue; a task on a queue no live worker consumes says so.

Precedence, as in Celery: ``apply_async(queue=...)``, then the task's own ``queue=``, then
the app's ``routes``, then the default queue.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import wait_until

from nbtask import App, ConfigurationError, Settings, State, Task, chain, group
from nbtask.client.live_workers import REFRESH_SECONDS
from nbtask.client.routes import Routes

pytestmark = pytest.mark.brokers

ROUTES = {
    "routing.etl.*": "near",
    "routing.etl.special": {"queue": "special"},  # a name wins over an earlier pattern
    "routing.e*": "first-pattern-only",  # never reached for routing.etl.*: first wins
    "routing.x?": "second",
    "tests.sample_tasks.*": "near",
}


@pytest.fixture
def routed(settings: Settings) -> Iterator[App]:
    """A client app with :data:`ROUTES`."""
    application = App("routed", settings=settings, routes=ROUTES)
    yield application
    application.close()


def _queue_task(app: App, name: str, **options: Any) -> Task:
    """A task that returns the queue its message came from."""

    @app.task(name=name, bind=True, **options)
    def where(self: Task, *_ignored: Any) -> str:
        return self.request.queue

    return where


def test_routes_pick_the_queue_in_celerys_precedence(
    routed: App, start_worker: Callable[..., Any]
) -> None:
    start_worker("-Q", "default,near,special,first-pattern-only,second,own,call")
    etl = _queue_task(routed, "routing.etl.load")
    special = _queue_task(routed, "routing.etl.special")
    other = _queue_task(routed, "routing.else")
    short = _queue_task(routed, "routing.xy")
    plain = _queue_task(routed, "unrouted.task")
    own = _queue_task(routed, "routing.etl.own", queue="own")

    cases = {
        etl.delay(): "near",  # the first pattern that matches
        special.delay(): "special",  # the exact name, though a pattern came first
        other.delay(): "first-pattern-only",
        short.delay(): "second",  # ? matches one character
        plain.delay(): routed.settings.default_queue,  # no key matches
        own.delay(): "own",  # the task's own queue beats the routes
        etl.apply_async(queue="call"): "call",  # the call beats everything
        own.apply_async(queue="call"): "call",
    }
    for handle, queue in cases.items():
        assert handle.queue == queue, handle.name
        assert handle.get(timeout=20) == queue, handle.name
    by_name = routed.send_task("tests.sample_tasks.add", (2, 3))  # only the workers know it
    assert by_name.queue == "near" and by_name.get(timeout=20) == 5
    # Every way of sending goes by the same rule, a chain's later steps included: the
    # client routes them when the chain is sent, and a worker sends them there.
    assert [h.get(timeout=20) for h in etl.delay_many([(), ()])] == ["near", "near"]
    assert group([etl.s(), plain.s()]).delay().get(timeout=20) == ["near", "default"]
    assert (plain.s() | special.s() | short.s()).delay().get(timeout=20) == "second"
    last = chain(etl.s(), special.s()).delay()
    assert last.get(timeout=20) == "special"
    assert last.parent is not None and last.parent.get(timeout=20) == "near"


def test_a_name_wins_then_the_first_pattern_that_matches() -> None:
    routes = Routes({"a.*": "one", "a.[bc]*": "two", "a.b": "exact", "?.z": "three"})
    assert [routes.queue_for(n) for n in ("a.b", "a.bx", "a.cx", "b.z", "bb.z", "A.x")] == [
        "exact",
        "one",
        "one",
        "three",
        None,
        None,  # case matters, as in task names
    ]
    assert Routes({"a.[bc]*": "two", "a.*": "one"}).queue_for("a.cx") == "two"
    assert Routes(None).table == {} and Routes(None).queue_for("a.b") is None


BAD_ROUTES: list[tuple[Any, str]] = [
    (["routing.*"], "routes= takes a dict of task names or patterns to queues"),
    ({"routing.*": 3}, "routes['routing.*'] must be a queue name or {'queue': name}"),
    ({"routing.*": ""}, "routes['routing.*'] must be a queue name"),
    ({"routing.*": {"queue": 5}}, "routes['routing.*'] must be a queue name"),
    ({"routing.*": {}}, "routes['routing.*'] must be a queue name"),
    ({"routing.*": {"queue": "q", "routing_key": "q"}}, "routes['routing.*'] has 'routing_key'"),
    ({3: "q"}, "routes key 3 is not a task name or pattern"),
    ({" ": "q"}, "routes key ' ' is not a task name or pattern"),
    ({"routing.*": "near-s3 "}, "routes['routing.*'] must be a queue name without spaces around"),
    ({"routing.*": {"queue": " q"}}, "routes['routing.*'] must be a queue name without spaces"),
]


@pytest.mark.parametrize(("routes", "message"), BAD_ROUTES)
def test_a_bad_routes_value_is_one_clear_error_at_creation(routes: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        App("bad", settings=Settings(insecure=True), routes=routes)
    assert message in str(caught.value)
    app = App("set-later", settings=Settings(insecure=True))
    try:
        with pytest.raises(ConfigurationError, match="routes"):
            app.routes = routes
        assert app.routes == {}  # a refused value leaves the routes as they were
    finally:
        app.close()


def test_a_task_on_a_queue_nobody_consumes_says_so_until_a_worker_comes(
    app: App, settings: Settings, start_worker: Callable[..., Any]
) -> None:
    start_worker()  # workers of the default queue only
    app.routes = {"lonely.*": "lonely"}
    task = _queue_task(app, "lonely.job")
    fine = _queue_task(app, "served.job")
    served = fine.delay()
    handle = task.delay()
    reason = "no live worker consumes queue 'lonely'"
    assert handle.state is State.PENDING
    assert handle.waiting_reason == reason
    assert handle.info["waiting"] == reason
    assert f"waiting: {reason}" in repr(handle)
    with pytest.raises(TimeoutError, match=f"still PENDING after 0.2 s \\(waiting: {reason}\\)"):
        handle.get(timeout=0.2)
    assert served.get(timeout=20) == "default"
    assert served.waiting_reason is None and "waiting" not in served.info
    # Another client re-attached by id sees the same (the queue is in the task's record).
    other = App("other", settings=settings)
    try:
        assert other.handle(handle.id).waiting_reason == reason
    finally:
        other.close()
    # A worker of that queue comes: the task runs, and nothing waits any more.
    start_worker("-Q", "lonely", concurrency=1)
    assert handle.get(timeout=20) == "lonely"
    assert handle.waiting_reason is None and "waiting" not in handle.info


def test_the_reason_clears_while_the_task_is_still_pending(
    app: App, start_worker: Callable[..., Any]
) -> None:
    # A countdown keeps the task PENDING after its worker comes: the notice goes by the
    # registry, read again while the handle waits, not by the task starting.
    start_worker()
    task = _queue_task(app, "late.job", queue="late")
    handle = task.apply_async(countdown=120)
    assert handle.waiting_reason == "no live worker consumes queue 'late'"
    start_worker("-Q", "late", concurrency=1)
    wait_until(lambda: handle.waiting_reason is None, 3 * REFRESH_SECONDS, "the notice to clear")
    assert handle.state is State.PENDING
    assert handle.cancel()


def test_the_embedded_cluster_raises_no_false_alarm(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    with App("embedded", routes={"*.far": "far"}) as app:
        near = _queue_task(app, "embedded.near")
        far = _queue_task(app, "embedded.far")
        # The first send starts the cluster; its workers are in the registry by then.
        parked = near.apply_async(countdown=2)
        assert parked.state is State.PENDING and parked.waiting_reason is None
        assert parked.get(timeout=30) == app.settings.default_queue
        # Its workers consume the default queue alone: a routed task says so.
        away = far.delay()
        assert away.waiting_reason == "no live worker consumes queue 'far'"
        assert away.cancel()
