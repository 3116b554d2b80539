"""An app's routes: the queue of a task when neither its call nor the task names one.

``App(routes={"etl.*": "near-s3"})`` is Celery's ``task_routes`` in its dict form: keys are
task names or ``fnmatch`` patterns (``*``, ``?``, ``[...]``), values a queue name or
``{"queue": name}``. As in Celery, a key that is a task name itself wins over every
pattern; among patterns, the first that matches, in the dict's order, wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from nbtask.core.options import queue_name
from nbtask.errors import ConfigurationError

__all__ = ["Routes"]

_WILDCARDS = frozenset("*?[")
_EXAMPLE = "{'etl.*': 'near-s3'} or {'etl.*': {'queue': 'near-s3'}}"


class Routes:
    """Task names and name patterns mapped to queues, checked once when made.

    Parameters
    ----------
    routes
        ``{name or pattern: queue or {"queue": queue}}``; ``None`` for no routes.

    Raises
    ------
    ConfigurationError
        A key or value of another shape, naming the key and what is expected.
    """

    def __init__(self, routes: Mapping[str, Any] | None = None) -> None:
        if routes is None:
            routes = {}
        if not isinstance(routes, Mapping):
            raise ConfigurationError(
                f"routes= takes a dict of task names or patterns to queues, e.g. {_EXAMPLE}; "
                f"got {type(routes).__name__}"
            )
        #: ``{name or pattern: queue}``, in the order given.
        self.table: dict[str, str] = {key: _queue_of(key, value) for key, value in routes.items()}
        self._exact = {k: q for k, q in self.table.items() if not _WILDCARDS & set(k)}
        self._patterns = [
            (re.compile(fnmatch.translate(k)), q)
            for k, q in self.table.items()
            if k not in self._exact
        ]

    def queue_for(self, name: str) -> str | None:
        """The queue routed to for task ``name``, or ``None`` when no key matches it."""
        queue = self._exact.get(name)
        if queue is not None:
            return queue
        for pattern, queue in self._patterns:
            if pattern.match(name):
                return queue
        return None

    def __repr__(self) -> str:
        return f"Routes({self.table!r})"


def _queue_of(key: object, value: object) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigurationError(
            f"routes key {key!r} is not a task name or pattern: use a non-empty string such "
            "as 'etl.*'"
        )
    queue = value
    if isinstance(value, Mapping):
        extra = sorted(str(k) for k in value if k != "queue")
        if extra:
            raise ConfigurationError(
                f"routes[{key!r}] has {', '.join(map(repr, extra))}: nbtask routes by queue "
                "alone; give {'queue': name} or just the queue name"
            )
        queue = value.get("queue")
    if not isinstance(queue, str) or not queue.strip():
        raise ConfigurationError(
            f"routes[{key!r}] must be a queue name or {{'queue': name}}, e.g. {_EXAMPLE}; "
            f"got {value!r}"
        )
    return queue_name(queue, f"routes[{key!r}]")
