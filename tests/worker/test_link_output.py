"""What a ``link`` or ``link_error`` callback prints is its own task output, as any task's.

A callback is sent as a task of its own (with an id of its own, to the same client): its
prints stream to that client and stay in the store, ``app.handle(id).stdout``, as a
task's do, however the callback was named (defined here, or registered by name).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from nbtask import App

pytestmark = pytest.mark.brokers


def test_a_link_and_an_errback_print_as_tasks_do(app: App, start_worker: Any) -> None:
    start_worker()

    @app.task
    def add(x: int, y: int) -> int:
        print("add prints", x + y)
        return x + y

    @app.task
    def shout(value: int) -> int:
        print("link prints", value)
        return value

    @app.task
    def boom() -> None:
        raise ValueError("boom")

    @app.task
    def on_error(request: Any, exc: BaseException, traceback: str) -> None:
        print("errback prints", request.id, exc)

    linked, by_name, errback = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    links = [shout.s().set(task_id=linked)]
    links.append(app.signature("tests.sample_tasks.chatty").set(task_id=by_name))
    # Followed before they are sent (app.expect is for tasks a worker will send).
    follow = app.expect(linked, shout.name)
    follow_by_name = app.expect(by_name, "tests.sample_tasks.chatty")
    h = add.apply_async((1, 2), link=links)
    assert h.get(timeout=10) == 3 and h.stdout == "add prints 3\n"
    assert follow.get(timeout=10) == 3 and follow.stdout == "link prints 3\n"
    assert follow_by_name.get(timeout=10) == 3
    assert follow_by_name.stdout == "line 0\nline 1\nline 2\n"
    assert app.handle(linked).stdout == "link prints 3\n"  # kept, as a task's output is

    follow = app.expect(errback, on_error.name)
    failed = boom.apply_async(link_error=on_error.s().set(task_id=errback))
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=10)
    assert follow.get(timeout=10) is None
    assert follow.stdout == f"errback prints {failed.id} boom\n"
