"""How a run's outcome is made: a result of ``None``, and which tasks have handlers to call."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import task_message

from nbtask.core.task import Task
from nbtask.wire.events import EventType
from nbtask.wire.message import decode_value, split
from nbtask.worker.follow_ups import has_handlers
from nbtask.worker.settle import success_outcome


def _outcome(retval: Any, serializer: str = "cloudpickle") -> Any:
    stored: list[Any] = []
    outcome = success_outcome(
        task_message(serializer=serializer), retval, {"worker": "w"}, 0.5, 3, 1 << 20, stored.append
    )
    return outcome, stored


@pytest.mark.parametrize("serializer", ["cloudpickle", "json"])
def test_a_none_result_is_the_same_outcome_as_any_other_value_makes(serializer: str) -> None:
    outcome, stored = _outcome(None, serializer)
    split_none = split(None, serializer, "x", 1 << 20)
    assert outcome.body == b"".join(bytes(part) for part in split_none.inline)
    assert outcome.event.type is EventType.SUCCESS
    assert outcome.event.seq == 3
    assert outcome.event.data == {"worker": "w", "runtime": 0.5, "serializer": serializer}
    assert stored in ([], [{}])  # no blob
    assert decode_value(outcome.body, serializer, outcome.event.data.get("layout")) is None
    # A value beside it keeps its own path (and its body decodes to it).
    other, _ = _outcome([1, None], serializer)
    assert decode_value(other.body, serializer, other.event.data.get("layout")) == [1, None]


class _Plain(Task):
    name = "plain"


class _OwnSuccess(Task):
    name = "own"

    def on_success(self, *args: Any) -> None:
        pass


def _after(*args: Any) -> None:
    pass


def test_handlers_are_found_on_the_class_in_options_and_on_the_instance() -> None:
    assert not has_handlers(_Plain())
    assert has_handlers(_OwnSuccess())
    # @app.task(after_return=...) makes a class attribute.
    assert has_handlers(type("opt", (Task,), {"name": "opt", "after_return": _after})())
    instance = _Plain()
    instance.on_failure = _after  # type: ignore[method-assign]
    assert has_handlers(instance)


def test_handlers_asked_for_by_name_before_start_among_them() -> None:
    assert not has_handlers(_Plain(), ("before_start",))
    assert not has_handlers(_OwnSuccess(), ("before_start", "on_failure"))
    assert has_handlers(_OwnSuccess(), ("on_success",))
    starts = type("starts", (Task,), {"name": "starts", "before_start": _after})()
    assert has_handlers(starts, ("before_start",)) and not has_handlers(starts)
    # The instance's own attribute wins over its class's: Task's own handler does nothing.
    instance = _OwnSuccess()
    instance.on_success = Task.on_success.__get__(instance)  # type: ignore[method-assign]
    assert not has_handlers(instance)
