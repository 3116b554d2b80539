"""A careless caller's times: a countdown, eta, expires or time limit that is no number,
not finite, of another kind or past what a worker keeps (the end of year 9999, 1e9 seconds) is
refused naming the option, per call and as a task's option, before anything is sent."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from raw_broker import RawBroker

from nbtask import App, Task
from nbtask.errors import ConfigurationError


def test_a_countdown_that_is_no_number_names_the_option_and_sends_nothing(
    add: Task, access: RawBroker
) -> None:
    with pytest.raises(ConfigurationError, match=r"countdown='x' is not a number of seconds"):
        add.apply_async((1, 2), countdown="x")  # type: ignore[arg-type]
    assert access.drained()


@pytest.mark.parametrize("countdown", [1e300, 10**400], ids=["1e300", "10**400"])
def test_a_retry_too_far_off_fails_the_task_naming_the_countdown(
    app: App, start_worker: Any, countdown: float
) -> None:
    """Before, 1e300 was sent on and refused by the worker as a bad header, and an integer
    no float holds failed the task with OverflowError."""
    start_worker()

    @app.task(bind=True, max_retries=1)
    def far(self: Any) -> None:
        raise self.retry(countdown=countdown)

    with pytest.raises(ConfigurationError, match=r"countdown=.* past the end of year 9999"):
        far.delay().get(timeout=30)


def test_the_latest_datetime_as_expires_means_never_and_runs(app: App, start_worker: Any) -> None:
    """``datetime.max`` as a float is one second past 9999's last: it was refused."""
    start_worker()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    never = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    assert add.apply_async((1, 2), expires=never).get(timeout=30) == 3


def test_an_eta_or_expires_of_another_kind_names_the_option(add: Task, access: RawBroker) -> None:
    with pytest.raises(ConfigurationError, match=r"expires='x' is not a datetime or a number"):
        add.apply_async((1, 2), expires="x")  # type: ignore[arg-type]
    naive = dt.datetime(2030, 1, 1)
    aware = r"eta=datetime.datetime\(2030, 1, 1, 0, 0\) has no timezone.*timezone.utc.*countdown="
    with pytest.raises(ConfigurationError, match=aware):
        add.apply_async((1, 2), eta=naive)
    assert access.drained()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), True])
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("countdown", "is not a number of seconds"),
        ("expires", "is not a datetime or a number of seconds"),
        ("eta", "is not a datetime or a number of seconds"),
        ("time_limit", "must be a positive number of seconds"),
        ("soft_time_limit", "must be a positive number of seconds"),
    ],
)
def test_a_time_that_is_not_a_finite_number_names_the_option_and_sends_nothing(
    add: Task, access: RawBroker, option: str, message: str, value: float
) -> None:
    """nan would be no time at all (Redis refuses it as a score), inf a task parked for good."""
    with pytest.raises(ConfigurationError, match=f"{option}.*{message}"):
        add.apply_async((1, 2), **{option: value})
    assert access.drained()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_task_time_limit_that_is_not_finite_is_refused_when_the_task_is_made(
    app: App, value: float
) -> None:
    with pytest.raises(ConfigurationError, match="time_limit must be a positive number"):
        app.task(time_limit=value)(lambda: None)


_WEST = dt.timezone(dt.timedelta(hours=-5))  # 9999-12-31 23:00 there is year 10000 in UTC
_PAST_9999 = r"is out of range: it makes a time past the end of year 9999"
_BEFORE_1970 = r"more than 8,000 years before 1970"
_LIMIT = r"must be a positive number of seconds, at most 1e\+09 \(about 31 years\), got "


def _short(value: object) -> str:
    """A test id: an integer of 400 digits is not spelt out."""
    return f"{value!r:.24}"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("countdown", 1e300, rf"countdown=1e\+300 {_PAST_9999}"),
        ("countdown", 10**400, rf"countdown=1000000000000\.\.\. \(401 digits\) {_PAST_9999}"),
        ("countdown", 2.53e11, _PAST_9999),  # under the latest time, but not from now
        ("countdown", -1e300, rf"countdown=-1e\+300 is out of range.*{_BEFORE_1970}"),
        ("eta", 1e300, rf"eta=1e\+300 {_PAST_9999}.*give an earlier one"),
        ("eta", 10**400, _PAST_9999),
        ("eta", -(10**400), _BEFORE_1970),
        ("eta", dt.datetime(9999, 12, 31, 23, tzinfo=_WEST), _PAST_9999),
        ("expires", 1e300, rf"expires=1e\+300 {_PAST_9999}.*leave expires out"),
        ("expires", 10**400, _PAST_9999),
        ("expires", dt.datetime(9999, 12, 31, 23, tzinfo=_WEST), _PAST_9999),
        ("time_limit", 1e300, rf"time_limit {_LIMIT}1e\+300"),
        ("time_limit", 10**400, rf"time_limit {_LIMIT}1000000000000\.\.\. \(401 digits\)"),
        ("soft_time_limit", 1e12, rf"soft_time_limit {_LIMIT}1000000000000\.0"),
        ("soft_time_limit", 10**400, rf"soft_time_limit {_LIMIT}"),
    ],
    ids=_short,
)
def test_a_time_nbtask_cannot_keep_names_the_option_and_sends_nothing(
    app: App, add: Task, access: RawBroker, option: str, value: Any, message: str
) -> None:
    """Before, such a task was sent: a worker refused it (dead-lettered naming the header
    field), or it waited for good in the ETA set, or its soft limit raised OverflowError in
    the worker; an integer no float holds raised OverflowError in the caller."""
    for send in (
        lambda: add.apply_async((1, 2), task_id="far-1", **{option: value}),
        lambda: add.s(1, 2).set(task_id="far-2", **{option: value}).delay(),
        lambda: app.send_task("elsewhere.add", (1, 2), task_id="far-3", **{option: value}),
        lambda: add.apply_async((1, 2), task_id="far-4", link=add.s(3).set(**{option: value})),
    ):
        with pytest.raises(ConfigurationError, match=message):
            send()
    assert access.drained()
    assert not any(access.record(f"far-{n}") for n in range(1, 5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"expires": 1e300}, rf"expires {_LIMIT}1e\+300"),
        ({"time_limit": 10**400}, rf"time_limit {_LIMIT}1000000000000\.\.\. \(401 digits\)"),
        ({"soft_time_limit": 1e12}, rf"soft_time_limit {_LIMIT}"),
        ({"retry_backoff_max": 1e300}, rf"retry_backoff_max {_LIMIT}"),
        ({"default_retry_delay": 10**400}, r"default_retry_delay must be a number of seconds"),
        ({"retry_kwargs": {"countdown": 10**400}}, rf"retry_kwargs' countdown=.* {_PAST_9999}"),
    ],
    ids=_short,
)
def test_a_task_time_nbtask_cannot_keep_is_refused_when_the_task_is_made(
    app: App, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        app.task(**options)(lambda: None)


def test_a_soft_time_limit_not_below_the_hard_one_is_refused(
    app: App, add: Task, access: RawBroker
) -> None:
    # It could never be raised: the hard limit kills the process first.
    message = r"soft_time_limit=3 is not below time_limit=1.*killed before SoftTimeLimitExceeded"
    with pytest.raises(ConfigurationError, match=message):
        app.task(time_limit=1, soft_time_limit=3)(lambda: None)
    with pytest.raises(ConfigurationError, match=message):
        add.apply_async((1, 2), time_limit=1, soft_time_limit=3)
    limited = app.task(time_limit=1, name="limited")(lambda: None)
    with pytest.raises(ConfigurationError, match=r"soft_time_limit=1 is not below time_limit=1"):
        limited.apply_async(soft_time_limit=1)  # the call's soft limit, the task's hard one
    assert access.drained()
