"""What a careless caller of the function API gets: one error naming the argument at fault."""

from __future__ import annotations

from typing import Any

import pytest
from raw_broker import RawBroker

from nbtask import App
from nbtask.errors import ConfigurationError


def test_a_countdown_that_is_no_number_names_the_option_and_sends_nothing(
    app: App, access: RawBroker
) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match=r"countdown='x' is not a number of seconds"):
        add.apply_async((1, 2), countdown="x")  # type: ignore[arg-type]
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
    app: App, access: RawBroker, args: Any, kwargs: Any, message: str
) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

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
