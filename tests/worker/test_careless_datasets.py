"""Named datasets given carelessly: a loader that fails, yields, or names nothing held.

Real worker processes on the real Redis; the loaders are in ``tests/sample_datasets.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import remote_of, wait_until
from raw_broker import RawBroker

from nbtask import App, ConfigurationError
from nbtask.core.datasets import DatasetError


def test_a_loader_that_fails_fails_the_task_naming_the_dataset(app: App, start_worker) -> None:
    start_worker("--data", "catalog=tests.sample_datasets:unreadable", concurrency=1)

    @app.task(requires="catalog")
    def count(catalog: list[int]) -> int:
        return len(catalog)

    for _ in range(2):  # nothing is cached: each task tries again, and says the same
        with pytest.raises(DatasetError) as info:
            count.delay().get(timeout=20)
        message = str(info.value)
        assert "dataset 'catalog' could not be loaded" in message, message
        assert "tests.sample_datasets:unreadable raised FileNotFoundError" in message, message
        assert "in unreadable\n" in remote_of(info.value).traceback  # the loader's own frame


def test_a_loader_returning_a_generator_is_refused_and_an_async_one_is_awaited(
    app: App, start_worker
) -> None:
    start_worker(
        "--data",
        "rows=tests.sample_datasets:rows_later",
        "--data",
        "numbers=tests.sample_datasets:fetched",
        concurrency=1,
    )

    @app.task(requires="rows")
    def first(rows: Any) -> list[int]:
        return list(rows)

    @app.task(requires="numbers")
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    with pytest.raises(DatasetError, match=r"'rows': its loader .* returned a generator"):
        first.delay().get(timeout=20)
    assert total.delay().get(timeout=20) == 6


def test_a_generator_function_is_refused_as_a_loader(app: App) -> None:
    def rows() -> Any:
        yield [1, 2, 3]

    with pytest.raises(ConfigurationError, match=r"is a generator function .* return it instead"):
        app.dataset("rows")(rows)
    with pytest.raises(ConfigurationError, match="is not a function"):
        app.dataset("rows")([1, 2, 3])  # type: ignore[arg-type]
    named = r"takes the name first: @app.dataset\('rows'\)"
    with pytest.raises(ConfigurationError, match=named):
        app.dataset(rows)  # type: ignore[arg-type]
    assert app.datasets == {}


def test_a_task_requiring_a_dataset_no_live_worker_holds_says_which_are_held(
    app: App, start_worker
) -> None:
    start_worker("--data", "squares=tests.sample_tasks:load_squares", concurrency=1)

    @app.task(requires="sqaures")  # misspelt
    def total(sqaures: list[int]) -> int:
        return sum(sqaures)

    handle = total.delay()
    expected = (
        "no live worker holds dataset 'sqaures' (the live ones hold: squares); start one "
        "with nbtask worker --data sqaures=module:function"
    )
    wait_until(lambda: handle.waiting_reason == expected, 10, repr(handle.waiting_reason))
    app.revoke(handle.id)


def test_a_dataset_the_task_does_not_take_or_the_caller_passes_is_refused(
    app: App, access: RawBroker
) -> None:
    taken = r"count requires 'catalog', which its workers pass as a keyword argument of that "
    with pytest.raises(ConfigurationError, match=taken + r"name: give .*count a parameter catalog"):

        @app.task(requires="catalog")
        def count(kind: str) -> int:
            return len(kind)

    @app.task(requires="catalog")
    def total(kind: str, catalog: list[int]) -> int:
        return len(catalog)

    passed = "catalog= is the dataset it requires, which its workers pass; do not pass it"
    with pytest.raises(TypeError, match=passed):  # the worker's copy would replace it
        total.apply_async(("a",), {"catalog": [1]})
    with pytest.raises(TypeError, match=r"'catalog' \(catalog is a dataset it requires: its"):
        total.delay("a", [1])
    assert access.drained()
