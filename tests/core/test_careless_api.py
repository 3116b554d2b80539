"""What a careless caller of the function API gets: one error naming the argument at fault."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from typing import Any

import pytest
from raw_broker import RawBroker

from nbtask import App, Task, group
from nbtask.errors import ConfigurationError, RemoteError, SerializationError

_GUARD = threading.Lock()  # a notebook's global a task reads, which cannot be pickled


def test_a_task_reading_what_cannot_be_pickled_names_it_and_sends_nothing(
    app: App, access: RawBroker
) -> None:
    @app.task
    def guarded(x: int) -> int:
        with _GUARD:
            return x

    with pytest.raises(SerializationError, match=r"reads the global '_GUARD' \(lock\)"):
        guarded.delay(1)
    db = sqlite3.connect(":memory:")

    @app.task
    def counted() -> int:
        return int(db.execute("select 1").fetchone()[0])

    with pytest.raises(SerializationError, match=r"'db' of its closure \(Connection\)"):
        counted.delay()
    db.close()
    assert access.drained()


@pytest.mark.parametrize("queue", ["near-s3 ", " ", 3])
def test_a_queue_no_worker_can_serve_is_refused_before_sending(
    app: App, add: Task, access: RawBroker, queue: Any
) -> None:
    message = r"queue must be a queue name without spaces around it.*-Q near-s3\), got "
    with pytest.raises(ConfigurationError, match=message):
        add.apply_async((1, 2), queue=queue)
    with pytest.raises(ConfigurationError, match=message):
        app.task(queue=queue, name="elsewhere")(lambda: None)
    assert access.drained()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (1, None, r"args=\.\.\.\) takes a tuple or list .*got int 1"),
        ("ab", None, r"got str 'ab'; to pass one value, give \('ab',\)"),
        ((1,), [2], r"kwargs=\.\.\.\) takes a dict .*got list \[2\]"),
    ],
)
def test_arguments_of_another_shape_are_refused_before_sending(
    add: Task, access: RawBroker, args: Any, kwargs: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        add.apply_async(args, kwargs)
    assert access.drained()


def test_retry_misuse_fails_the_task_naming_the_argument(app: App, start_worker: Any) -> None:
    start_worker()

    @app.task(bind=True, max_retries=1)
    def soon(self: Any) -> None:
        raise self.retry(countdown="soon")

    @app.task(bind=True, max_retries=1)
    def text(self: Any) -> None:
        raise self.retry(exc="it broke", countdown=0)

    with pytest.raises(ConfigurationError, match=r"countdown='soon' is not a number of seconds"):
        soon.delay().get(timeout=30)
    with pytest.raises(ConfigurationError, match=r"retry\(exc=\.\.\.\) takes the exception"):
        text.delay().get(timeout=30)


def test_a_call_that_does_not_fit_the_task_is_refused_in_the_caller_and_sends_nothing(
    app: App, add: Task, access: RawBroker
) -> None:
    @app.task(bind=True)
    def bound(self: Any, x: int) -> int:
        return x

    @app.task(requires=("squares",))
    def uses(n: int, squares: list[int]) -> int:
        return n

    wrong = [
        (lambda: add.delay(1), r"\.add\(x, y\): missing a required argument: 'y'"),
        (lambda: add.delay(1, 2, 3), "too many positional arguments"),
        # A misspelt keyword is named, as Python names it, not the parameter it left out.
        (lambda: add.apply_async((1,), {"z": 2}), "got an unexpected keyword argument 'z'"),
        (bound.delay, r"\.bound\(x\): missing a required argument: 'x'"),
        (lambda: add.delay_many([(1, 2), (3,)]), "missing a required argument: 'y'"),
        (lambda: group([add.s(1, 2), add.s(1)]).delay(), "missing a required argument"),
        (uses.delay, "missing a required argument: 'n'"),
    ]
    for call, message in wrong:
        with pytest.raises(TypeError, match=f"{message}.*nothing was sent"):
            call()
    assert access.drained()
    sent = uses.delay(1)  # the dataset comes from the worker: not the caller's to give
    record = app.store.get_record(sent.id)
    assert record is not None and record.state == "PENDING"


def test_a_chain_step_the_previous_result_does_not_fit_is_refused_before_anything_is_sent(
    app: App, add: Task, access: RawBroker, start_worker: Any
) -> None:
    @app.task
    def gather(*values: int) -> int:
        return sum(values)

    @app.task(typing=False)
    def loose(x: int) -> int:
        return x

    wrong = [
        (add.s(1, 2) | add.s(1, 2), r"chain step 2 of 2 \(.*add\(1, 2\), given step 1's result"),
        (add.s(1, 2) | add.s(1) | add.s(), r"chain step 3 of 3 .*missing a required argument"),
        (add.s(1, 2) | add.si(1), r"chain step 2 of 2 \(.*add!\(1\)\): .*missing a required"),
        (add.s(1, 2) | add.s(x=1), r"chain step 2 of 2 .*multiple values for argument 'x'"),
    ]
    for workflow, message in wrong:
        with pytest.raises(TypeError, match=f"{message}.*nothing was sent"):
            workflow.delay()
    assert access.drained()
    # Steps that take the result: *args, immutable, a task not checked (typing=False).
    start_worker()
    fitting = add.s(1, 2) | add.s(10) | gather.s(1, 1) | add.si(5, 5) | loose.s()
    assert fitting.delay().get(timeout=30) == 10


def test_a_call_that_fitted_does_not_let_a_call_of_another_shape_through(
    app: App, add: Task, access: RawBroker
) -> None:
    """Calls are checked by shape (positional count, keyword names) once each shape fits."""
    for _ in range(2):
        add.delay(1, 2)
        add.apply_async((1,), {"y": 2})
    for _ in range(2):  # refused every time: a shape that does not fit is never kept
        for call in (lambda: add.delay(1), lambda: add.apply_async((1,), {"z": 2})):
            with pytest.raises(TypeError, match="nothing was sent"):
                call()
    app.flush()
    assert access.leftover()["queued"] == 4


def test_typing_false_sends_a_call_that_does_not_fit_and_the_worker_says_so(
    app: App, start_worker: Any
) -> None:
    start_worker()

    @app.task(typing=False)
    def one(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="takes 1 positional argument but 2 were given"):
        one.delay(1, 2).get(timeout=30)
    with pytest.raises(ConfigurationError, match="typing must be True or False"):
        app.task(typing="no")(lambda: None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": 5}, r"priority is not supported.*queue='urgent'"),
        ({"serializer": "json"}, r"serializer=\.\.\.\) is Celery's.*@app.task\(serializer="),
        ({"routing_key": "urgent"}, r"routing_key=\.\.\.\) is Celery's.*pass queue="),
        ({"retry": True}, r"retry=\.\.\.\) is Celery's.*leave it out"),
        # Before, these were a bare TypeError (unexpected keyword argument).
        ({"add_to_parent": False}, r"add_to_parent=\.\.\.\) is Celery's.*keep the handles"),
        ({"reply_to": "q"}, r"reply_to=\.\.\.\) is Celery's.*leave it out"),
        ({"producer": object()}, r"producer=\.\.\.\) is Celery's.*own connections"),
        ({"connection": object()}, r"connection=\.\.\.\) is Celery's.*own connections"),
        ({"delivery_mode": 2}, r"delivery_mode=\.\.\.\) is Celery's.*always kept"),
        ({"group_id": "g"}, r"group_id=\.\.\.\) is Celery's.*as a group"),
        ({"parent_id": "p"}, r"parent_id=\.\.\.\) is Celery's.*by itself"),
        ({"root_id": "r"}, r"root_id=\.\.\.\) is Celery's.*by itself"),
        ({"chord": object()}, r"chord=\.\.\.\) is Celery's.*no chords"),
    ],
)
def test_a_celery_send_option_nbtask_has_no_counterpart_for_says_what_to_do_and_sends_nothing(
    app: App, add: Task, access: RawBroker, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        add.apply_async((1, 2), **options)
    with pytest.raises(ConfigurationError, match=message):
        add.s(1, 2).set(**options).delay()
    with pytest.raises(ConfigurationError, match=message):
        app.send_task("elsewhere.add", (1, 2), **options)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prority'"):
        add.apply_async((1, 2), prority=5)
    assert access.drained()


def test_a_generator_function_is_refused_as_a_task(app: App) -> None:
    """Its body would never run: calling it only makes a generator."""

    def numbers() -> Any:
        yield 1

    with pytest.raises(ConfigurationError, match="numbers is a generator function"):
        app.task(numbers)


def test_an_async_def_task_runs_to_its_end_on_the_worker(app: App, start_worker: Any) -> None:
    start_worker()

    @app.task
    async def doubled(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    assert doubled.delay(21).get(timeout=30) == 42


def test_a_task_raising_system_exit_or_keyboard_interrupt_fails_as_a_remote_error(
    app: App, add: Task, start_worker: Any
) -> None:
    """Raised as they are in the caller, they would end its program or pass for a Ctrl-C."""
    start_worker()

    @app.task
    def leaves(code: int) -> None:
        raise SystemExit(code)

    @app.task
    def interrupts() -> None:
        raise KeyboardInterrupt

    with pytest.raises(RemoteError, match="SystemExit: 4") as exited:
        leaves.delay(4).get(timeout=30)
    assert exited.value.ename == "SystemExit"
    with pytest.raises(RemoteError, match="KeyboardInterrupt"):
        interrupts.delay().get(timeout=30)
    assert add.delay(1, 2).get(timeout=30) == 3  # the worker serves on


@pytest.mark.parametrize("item", [1, "ab", None])
def test_delay_many_with_an_item_that_is_not_an_argument_tuple_names_it_and_sends_nothing(
    add: Task, access: RawBroker, item: Any
) -> None:
    with pytest.raises(ConfigurationError, match=r"delay_many\(\)'s item 1 takes a tuple or list"):
        add.delay_many([(1, 2), item])
    assert access.drained()


@pytest.mark.parametrize("option", ["link", "link_error"])
@pytest.mark.parametrize("value", [7, "x", [7]])
def test_a_link_that_is_not_a_signature_names_the_option_and_sends_nothing(
    add: Task, access: RawBroker, option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError, match=rf"{option} takes signatures \(task.s\(...\)\)"):
        add.apply_async((1, 2), **{option: value})
    assert access.drained()


@pytest.mark.parametrize("timeout", ["5", float("nan"), True, [1]])
def test_a_get_timeout_that_is_no_number_of_seconds_is_one_clear_error(
    add: Task, timeout: Any
) -> None:
    handle = add.delay(1, 2)
    with pytest.raises(ConfigurationError, match=r"timeout=.* is not a number of seconds"):
        handle.get(timeout=timeout)


@pytest.mark.parametrize("timeout", [10**400, 1e300, 1e12], ids=["10**400", "1e300", "1e12"])
def test_a_get_timeout_no_wait_can_take_is_one_clear_error(add: Task, timeout: float) -> None:
    """Before, OverflowError (int too large to convert to float; timestamp out of range)."""
    handle = add.delay(1, 2)
    message = r"timeout=.{1,40} is not a number of seconds up to 1e\+09; give seconds, or None"
    with pytest.raises(ConfigurationError, match=message):
        handle.get(timeout=timeout)


@pytest.mark.parametrize(
    "target", [functools.partial(max, 3), type("Doubler", (), {"__call__": lambda s, x: 2 * x})()]
)
def test_a_callable_that_is_no_function_is_refused_as_a_task(app: App, target: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"@app.task needs a function \(def or lambda\)"):
        app.task(target)


def test_a_worker_started_after_the_first_send_is_seen_before_a_task_is_said_to_wait_for_one(
    add: Task, start_worker: Any
) -> None:
    add.delay(1, 2)  # the registry is read: no worker yet
    start_worker(concurrency=1)
    handle = add.delay(2, 3)
    assert handle.get(timeout=20) == 5
    # Within the registry's refresh period, a waiting task does not claim no worker serves it.
    assert handle.app is not None
    assert handle.app.waiting_reason(handle.queue) is None


@pytest.mark.parametrize("task_id", ["", None, 5, "../x", "a b"])
def test_revoke_or_follow_a_task_by_an_id_that_cannot_be_one_is_refused(
    app: App, task_id: Any
) -> None:
    with pytest.raises(ConfigurationError, match=r"task_id=.* is not a valid id"):
        app.revoke(task_id)
    with pytest.raises(ConfigurationError, match=r"task_id=.* is not a valid id"):
        app.handle(task_id)


@pytest.mark.parametrize("name", ["", "  ", None])
def test_send_task_without_a_name_is_refused(app: App, access: RawBroker, name: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"send_task needs a task's name"):
        app.send_task(name)
    assert access.drained()


@pytest.mark.parametrize(
    ("queues", "message"),
    [
        ("default", r"takes a list of queue names, got str 'default'; give \['default'\]"),
        ([5], r"purge must be a queue name .*got 5"),
        ([""], r"purge must be a queue name .*got ''"),
    ],
)
def test_purge_of_something_that_is_no_list_of_queue_names_is_refused(
    add: Task, queues: Any, message: str
) -> None:
    waiting = add.delay(1, 2)
    with pytest.raises(ConfigurationError, match=message):
        add.app.purge(queues)  # type: ignore[union-attr]
    assert waiting.state == "PENDING"  # nothing was purged


def test_a_closed_app_sends_nothing_and_says_so(app: App, add: Task) -> None:
    add.delay(1, 2)
    app.close()
    with pytest.raises(ConfigurationError, match=r"app 'test' is closed: make a new App"):
        add.delay(1, 2)
