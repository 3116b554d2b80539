"""A worker's journal keeps what a task's handlers print with that task, whole lines.

Another thread may print while the child moves on from a task: a line it was adding to
when the child did stays the task's (``about`` waits for the write, under the journal's
lock), never lost nor given to the next task.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from types import FrameType
from typing import Any

from nbtask.worker.journal import UNTIED, Journal


class _Store:
    """Keeps what the journal appends, by task."""

    def __init__(self) -> None:
        self.kept: list[tuple[str, list[str]]] = []

    def append_journal(self, task_id: str, lines: list[str]) -> None:
        self.kept.append((task_id, list(lines)))


def test_a_line_another_thread_is_adding_to_as_the_task_ends_stays_the_tasks() -> None:
    store = _Store()
    journal = Journal(store)  # type: ignore[arg-type]
    journal.about("A")
    journal.write("A's partial ")
    # The writing thread is held inside write(), its lock held, past taking the partial
    # line and before putting the rest back.
    inside, resume = threading.Event(), threading.Event()
    source, first = inspect.getsourcelines(Journal.write)
    rest_line = first + next(i for i, line in enumerate(source) if "*lines, self._partial" in line)

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call":
            return tracer if frame.f_code is Journal.write.__code__ else None
        if event == "line" and frame.f_lineno == rest_line and not inside.is_set():
            inside.set()
            resume.wait(10)
        return tracer

    def background() -> None:
        sys.settrace(tracer)
        try:
            journal.write("still A")
        finally:
            sys.settrace(None)

    writer = threading.Thread(target=background)
    writer.start()
    assert inside.wait(10)
    ended = threading.Thread(target=journal.about, args=("",))  # the child: A handled
    ended.start()
    ended.join(0.5)  # (it waits for the writer; unlocked, it went on at once)
    resume.set()
    writer.join(10)
    ended.join(10)
    journal.about("B")
    journal.write("B's line\n")
    journal.about("")
    assert store.kept == [("A", ["A's partial still A"]), ("B", ["B's line"])]


def test_a_line_a_background_thread_logs_about_no_task_is_not_the_running_tasks() -> None:
    """The holder's drop of a value no session names is logged while any task may run."""
    store = _Store()
    journal = Journal(store)  # type: ignore[arg-type]
    logger = logging.getLogger("nbtask.test-journal")
    logger.addHandler(journal)
    try:
        journal.about("A")
        logger.warning("dropped x from memory", extra=UNTIED)
        logger.warning("about A")
    finally:
        logger.removeHandler(journal)
    assert store.kept == [("A", ["WARNING about A"])]
