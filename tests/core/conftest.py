"""Fixtures of the core tests: small tasks to send in signatures, chains and groups, and
``add`` for the careless-caller tests."""

from __future__ import annotations

from typing import Any

import pytest

from nbtask import App, Task


@pytest.fixture
def steps(app: App) -> tuple[Any, Any, Any, Any]:
    """``add``, ``mul``, ``fail`` and ``note``: tasks defined like a notebook's, on ``app``.

    Shipped by value. ``fail`` raises ``ValueError(message)``; ``note`` records the value
    it is given in the file named by ``path`` (read with ``read_records``).
    """

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task
    def fail(x: object, message: str = "middle step failed") -> None:
        raise ValueError(message)

    @app.task
    def note(value: object, path: str) -> object:
        from tests.celery_tasks import record

        record(path, value=value)
        return value

    return add, mul, fail, note


@pytest.fixture
def add(app: App) -> Task:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    return add
