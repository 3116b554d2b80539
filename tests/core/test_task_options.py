"""``@app.task`` options, checked at decoration time.

Nothing here needs a broker: decorating a function never connects.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nbtask import App, ConfigurationError, Settings, Task
from nbtask.core import options
from nbtask.core.options import check_task_id, new_task_id
from tests import celery_tasks

pytestmark = pytest.mark.brokers


@pytest.fixture
def local() -> Iterator[App]:
    """An app that never connects (decoration only)."""
    application = App("options", settings=Settings(insecure=True))
    yield application
    application.close()


def _module_level_function(x: int) -> int:
    return x


# Every option of the list, with good values -----------------------------------------
GOOD: dict[str, Any] = {
    "name": "opts.everything",
    "bind": True,
    "max_retries": 5,
    "default_retry_delay": 2.5,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": False,
    "autoretry_for": (ConnectionError, TimeoutError),
    "dont_autoretry_for": (ConnectionRefusedError,),
    "retry_kwargs": {"max_retries": 2, "countdown": 1},
    "throws": (KeyError,),
    "track_started": True,
    "store_errors_even_if_ignored": True,
    "rate_limit": "10/s",
    "time_limit": 30,
    "soft_time_limit": 20,
    "ignore_result": True,
    "serializer": "json",
    "acks_late": True,
    "reject_on_worker_lost": True,
    "queue": "slow",
    "expires": 600,
    "started_after": 0.05,
}


def test_every_option_is_accepted_and_kept(local: App) -> None:
    class Base(local.Task):
        pass

    @local.task(base=Base, **GOOD)
    def everything(self: Task, x: int) -> int:
        return x

    assert isinstance(everything, Base)
    assert everything.name == "opts.everything"
    assert local.tasks["opts.everything"] is everything
    assert everything.bind is True
    assert everything.max_retries == 5
    assert everything.default_retry_delay == 2.5
    assert everything.retry_backoff == 2
    assert everything.retry_backoff_max == 60
    assert everything.retry_jitter is False
    assert everything.autoretry_for == (ConnectionError, TimeoutError)
    assert everything.dont_autoretry_for == (ConnectionRefusedError,)
    assert everything.retry_kwargs == {"max_retries": 2, "countdown": 1.0}
    assert everything.throws == (KeyError,)
    assert everything.track_started is True
    assert everything.store_errors_even_if_ignored is True
    assert everything.rate_limit == pytest.approx(10.0)
    assert everything.time_limit == 30
    assert everything.soft_time_limit == 20
    assert everything.ignore_result is True
    assert everything.serializer == "json"
    assert everything.acks_late is True
    assert everything.reject_on_worker_lost is True
    assert everything.queue == "slow"
    assert everything.expires == 600
    assert everything.started_after == 0.05
    # Calling it here runs it here (Celery's __call__), with self bound.
    assert everything(7) == 7


@pytest.mark.parametrize(
    ("rate", "per_second"),
    [
        ("10/s", 10.0),
        ("100/m", 100 / 60),
        ("1000/h", 1000 / 3600),
        ("5", 5.0),
        (2, 2.0),
        (0.5, 0.5),
    ],
)
def test_rate_limit_forms(local: App, rate: object, per_second: float) -> None:
    @local.task(rate_limit=rate)
    def limited() -> None:
        return None

    assert limited.rate_limit == pytest.approx(per_second)


def test_options_a_base_class_sets_work_as_the_decorators_do(local: App) -> None:
    # Converted when the class is made, as @app.task's are (before, kept as written: a
    # worker's rate limit failed every run with rate_limit = "100/s", a ResponseError).
    class RateBase(Task):
        rate_limit = "100/s"
        time_limit = 2
        max_retries = 2
        autoretry_for = KeyError

    @local.task(base=RateBase)
    def limited(x: int) -> int:
        return x

    assert limited.rate_limit == 100.0
    assert isinstance(limited.time_limit, float) and limited.time_limit == 2
    assert (limited.max_retries, limited.autoretry_for) == (2, (KeyError,))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"rate_limit": "ten"}, "rate_limit='ten' is not a rate: use e.g. '10/s'"),
        ({"time_limit": "2"}, "time_limit must be a positive number of seconds"),
        ({"max_retries": "2"}, "max_retries must be a whole number >= 0 or None, got '2'"),
        ({"priority": 5}, "priority is not supported"),
        ({"started_after": "10ms"}, "started_after must be a number of seconds, 0 or more"),
    ],
)
def test_a_wrong_option_a_base_class_sets_fails_when_it_is_made(
    body: dict[str, Any], error: str
) -> None:
    # The decorator's one error, naming the class (before, accepted: "ten" silently, the
    # others failed on the worker, at run time).
    with pytest.raises(ConfigurationError) as refused:
        type("BadBase", (Task,), body)
    assert str(refused.value).startswith(f"class BadBase: {error}")


def test_a_soft_limit_not_below_an_inherited_hard_one_is_refused(local: App) -> None:
    class Hard(Task):
        time_limit = 10

    with pytest.raises(ConfigurationError, match="soft_time_limit=20 is not below time_limit=10"):

        @local.task(base=Hard, soft_time_limit=20)
        def slow() -> None:
            return None


def test_single_exception_class_for_autoretry_for(local: App) -> None:
    @local.task(autoretry_for=KeyError)
    def flaky() -> None:
        return None

    assert flaky.autoretry_for == (KeyError,)


@pytest.mark.parametrize("backend", [None, False, True])
def test_backend_option(local: App, backend: object) -> None:
    @local.task(backend=backend)
    def stored() -> None:
        return None

    assert stored.store_result is bool(backend)


# Bad options: refused at decoration time, with a clear message --------------------------------
def _refused(local: App, **options: Any) -> str:
    with pytest.raises(ConfigurationError) as info:

        @local.task(**options)
        def victim() -> None:
            return None

    assert not any(name.endswith("victim") for name in local.tasks), "registered anyway"
    return str(info.value)


def test_unknown_option_is_named_with_the_known_ones(local: App) -> None:
    text = _refused(local, retries=3)
    assert "retries" in text
    assert "unknown" in text
    assert "max_retries" in text  # the list of known options helps spot the typo


def test_misspelled_option_with_good_ones(local: App) -> None:
    text = _refused(local, bind=True, time_limt=5)
    assert "time_limt" in text


@pytest.mark.parametrize("rate", ["ten", "10/x", "/s", "-5/s", "0/s", 0, -1, "10/s/s", True])
def test_bad_rate_limit(local: App, rate: object) -> None:
    text = _refused(local, rate_limit=rate)
    assert "rate_limit" in text
    assert repr(rate) in text
    assert "10/s" in text  # shows the accepted form


@pytest.mark.parametrize(
    "option",
    ["time_limit", "soft_time_limit", "expires", "retry_backoff_max"],
)
@pytest.mark.parametrize("value", [-1, 0, "5", True])
def test_limits_must_be_positive_seconds(local: App, option: str, value: object) -> None:
    text = _refused(local, **{option: value})
    assert option in text
    assert "positive" in text


@pytest.mark.parametrize("option", ["default_retry_delay", "started_after"])
@pytest.mark.parametrize("value", [-1, "5", True, float("nan")])
def test_delays_must_be_seconds_0_or_more(local: App, option: str, value: object) -> None:
    # started_after: refused when decorated, not on the worker at every run.
    text = _refused(local, **{option: value})
    assert option in text and "0 or more" in text


@pytest.mark.parametrize("value", [-1, 1.5, "3"])
def test_bad_max_retries(local: App, value: object) -> None:
    text = _refused(local, max_retries=value)
    assert "max_retries" in text
    assert repr(value) in text


def test_max_retries_none_means_forever(local: App) -> None:
    @local.task(max_retries=None)
    def forever() -> None:
        return None

    assert forever.max_retries is None


@pytest.mark.parametrize("serializer", ["pickle", "yaml", "JSON", "", None])
def test_bad_serializer(local: App, serializer: object) -> None:
    text = _refused(local, serializer=serializer)
    assert "serializer" in text
    assert "cloudpickle" in text
    assert "json" in text


@pytest.mark.parametrize(
    "value", ["ValueError", (ValueError, "KeyError"), int, (Exception, 3), ValueError("x")]
)
def test_bad_autoretry_for(local: App, value: object) -> None:
    text = _refused(local, autoretry_for=value)
    assert "autoretry_for" in text
    assert "exception classes" in text


@pytest.mark.parametrize("priority", [0, 5, 9])
def test_priority_is_refused_with_advice(local: App, priority: int) -> None:
    text = _refused(local, priority=priority)
    assert "priority" in text
    assert "queue" in text  # the advice: a queue of its own, served first
    assert "-Q" in text


@pytest.mark.parametrize("backend", ["redis://elsewhere", object()])
def test_bad_backend(local: App, backend: object) -> None:
    text = _refused(local, backend=backend)
    assert "backend" in text


def test_base_must_be_a_task_class(local: App) -> None:
    text = _refused(local, base=dict)
    assert "base" in text
    assert "app.Task" in text


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("bind", "yes"),
        ("acks_late", "no"),
        ("ignore_result", "false"),
        ("reject_on_worker_lost", "no"),
        ("retry_jitter", "off"),
        ("queue", 3),
    ],
)
def test_bad_types_for_flags_and_queue(local: App, option: str, value: object) -> None:
    # "a bad value raises at decoration time": ignore_result="false" would silently
    # throw results away, queue=3 would fail only when the first call is sent.
    text = _refused(local, **{option: value})
    assert option in text


# Names ----------------------------------------------------------------------------------------
def test_default_name_is_module_dot_function(local: App) -> None:
    task = local.task(_module_level_function)
    assert task.name == f"{__name__}._module_level_function"
    assert local.tasks[task.name] is task
    # The module-level tasks the workers import have the same kind of name.
    assert celery_tasks.use_db.name == "tests.celery_tasks.use_db"
    assert celery_tasks.mark.name == "tests.celery_tasks.mark"


def test_explicit_name(local: App) -> None:
    @local.task(name="proj.tasks.explicit")
    def whatever(x: int) -> int:
        return x * 2

    assert whatever.name == "proj.tasks.explicit"
    assert local.tasks["proj.tasks.explicit"] is whatever
    assert whatever(4) == 8


def test_positional_name_from_the_guide(local: App) -> None:
    @local.task("sum-of-two-numbers")
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == "sum-of-two-numbers"
    assert local.tasks["sum-of-two-numbers"] is add
    assert add(2, 3) == 5


def test_positional_name_with_options(local: App) -> None:
    @local.task("named-and-bound", bind=True, max_retries=1)
    def bound(self: Task) -> str:
        return self.name

    assert bound.name == "named-and-bound"
    assert bound.max_retries == 1
    assert bound() == "named-and-bound"


def test_two_functions_under_one_name_are_refused(local: App) -> None:
    @local.task(name="shared.name")
    def first() -> int:
        return 1

    with pytest.raises(ConfigurationError) as info:

        @local.task(name="shared.name")
        def second() -> int:
            return 2

    text = str(info.value)
    assert "shared.name" in text
    assert "first" in text and "second" in text
    assert local.tasks["shared.name"] is first


def test_redefinition_in_the_same_module_replaces(local: App) -> None:
    # A notebook cell run twice defines the same function again: the new code wins.
    tasks = []
    for result in (1, 2):

        @local.task
        def cell_task(result: int = result) -> int:
            return result

        tasks.append(cell_task)

    assert tasks[0].name == tasks[1].name
    assert local.tasks[tasks[1].name] is tasks[1]
    assert local.tasks[tasks[1].name]() == 2


def test_same_function_decorated_twice_maps_to_one_name(local: App) -> None:
    one = local.task(_module_level_function)
    two = local.task(_module_level_function)
    assert one.name == two.name
    assert local.tasks[one.name] is two
    assert len([n for n in local.tasks if n.endswith("_module_level_function")]) == 1


def test_app_task_base_is_abstract_and_never_registered(local: App) -> None:
    class MyBase(local.Task):
        def helper(self) -> int:
            return 42

    @local.task(base=MyBase)
    def uses_base() -> int:
        return 1

    assert list(local.tasks) == [uses_base.name]
    assert not any("MyBase" in name for name in local.tasks)
    with pytest.raises(ConfigurationError):
        local.register_task(local.Task())
    assert uses_base.helper() == 42


def test_new_task_ids_are_random_version_4_uuids() -> None:
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (task_id, 4, uuid.RFC_4122)
        assert check_task_id(task_id) == task_id


def test_a_forked_process_makes_task_ids_of_its_own() -> None:
    new_task_id()  # random bytes read ahead in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(new_task_id() for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_task_id() for _ in range(50)}
    assert len(child) == 50
    assert not child & parent


def test_a_process_forked_while_a_task_id_was_made_makes_ids_all_the_same() -> None:
    held = options._RANDOM._lock  # as if another thread were making an id at the fork
    held.acquire()
    try:
        pid = os.fork()
        if pid == 0:
            signal.alarm(5)  # a lock left held would hang the child: it dies of SIGALRM
            new_task_id()
            os._exit(0)
    finally:
        held.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("retry_kwargs", 5, r"retry_kwargs takes a dict of retry\(\) keywords"),
        ("retry_kwargs", {"exc": ValueError()}, r"unknown retry\(\) keyword\(s\) exc"),
        ("retry_kwargs", {"countdown": "soon"}, r"countdown='soon' is not a number"),
        ("retry_kwargs", {"max_retries": -1}, r"max_retries must be a whole number"),
        ("throws", "KeyError", r"throws takes exception classes"),
        ("dont_autoretry_for", [KeyError, 3], r"dont_autoretry_for takes exception classes"),
        ("track_started", "yes", r"track_started must be True or False"),
        ("store_errors_even_if_ignored", 1, r"store_errors_even_if_ignored must be True"),
        ("compression", "zlib", r"compression is not supported: .*travels as blobs"),
    ],
)
def test_celerys_retry_and_result_options_are_checked_when_decorated(
    local: App, option: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):

        @local.task(**{option: value})
        def t() -> None:
            pass
