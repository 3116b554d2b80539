"""Celery's task names nbtask has no counterpart for, each one error saying what to do.

``add.apply()``, ``add.map()``, ``add.starmap()`` and ``add.chunks()`` are Celery's ways
to run a task here or to run many calls as one task; on a :class:`~nbtask.Task` each
raises an ``AttributeError`` naming nbtask's way, rather than a bare one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["CeleryTaskNames"]


def _not_in_nbtask(name: str, instead: str) -> AttributeError:
    return AttributeError(f"task.{name} is Celery's; nbtask has no counterpart: {instead}")


class CeleryTaskNames:
    """Celery's task names nbtask refuses with advice, mixed into :class:`~nbtask.Task`.

    Typed as the methods they stand for, so a task class may define its own (a notebook
    cell's task has a ``map``).
    """

    @property
    def apply(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's run of the task in this process, as an eager result."""
        raise _not_in_nbtask(
            "apply()",
            "nbtask keeps no eager results. Call the task to run it here, in this "
            "process: add(2, 2); or send it to a worker and wait: add.delay(2, 2).get()",
        )

    @property
    def map(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's one task calling this one on each item in turn."""
        raise _not_in_nbtask(
            "map(items)",
            "send one task per item instead, in one round trip: "
            "add.delay_many([(x,) for x in items]), or group(add.s(x) for x in items).delay()",
        )

    @property
    def starmap(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's one task calling this one on each argument tuple."""
        raise _not_in_nbtask(
            "starmap(items)",
            "send one task per argument tuple instead, in one round trip: "
            "add.delay_many(items), or group(add.s(*args) for args in items).delay()",
        )

    @property
    def chunks(self) -> Callable[..., Any]:
        """Not in nbtask: Celery's split of many calls into tasks of ``n`` calls each."""
        raise _not_in_nbtask(
            "chunks(items, n)",
            "write a task that runs one chunk, @app.task def add_chunk(pairs): return "
            "[x + y for x, y in pairs], and send one per chunk: group(add_chunk.s(items[i:i "
            "+ n]) for i in range(0, len(items), n)).delay()",
        )
