"""Views without a kernel: the output log, text views, the notebook group."""

from __future__ import annotations

import io
import tracemalloc

import pytest
from helpers import display_event as display

from nbtask._text import count_text
from nbtask.core.handle import TaskHandle
from nbtask.notebook.board import Row, notebook_group
from nbtask.notebook.outputs import OutputLog
from nbtask.notebook.remote_errors import exception_type
from nbtask.notebook.widgets import TextView
from nbtask.wire.events import Event, EventType


def test_display_updates_replace_the_display_they_name() -> None:
    log = OutputLog()
    log.add(Event(EventType.STDOUT, "t", 1, {"text": "a"}))
    log.add(Event(EventType.STDOUT, "t", 2, {"text": "b\n"}))
    log.add(display(3, "bar 0", "d1"))
    log.add(display(4, "other"))
    log.add(display(5, "bar 1", "d1", update=True))
    log.add(display(6, "nowhere", "d2", update=True))  # unknown id: nothing shown
    assert [o.get("text") or o["data"]["text/plain"] for o in log.outputs] == [
        "ab\n",
        "bar 1",
        "other",
    ]
    assert log.text() == "ab\nbar 1\nother\n"
    log.add(Event(EventType.DISPLAY, "t", 7, {"clear": True}))
    assert log.outputs == [] and log.ids == []


def test_text_view_in_a_terminal_prints_and_ticks_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    view = TextView(TaskHandle(None, "t", "x"), "label", in_kernel=False)
    view.apply(Event(EventType.STARTED, "t", 1, {"worker": "host", "pid": 1}))
    view.apply(display(2, "shown", "d"))
    view.tick()
    view.apply(display(3, "again", "d", update=True))
    view.apply(Event(EventType.SUCCESS, "t", 4, {}))
    assert view.text == "again\n"
    assert "shown" in out.getvalue() and "SUCCESS" in out.getvalue()


class Discard(io.TextIOBase):
    """A terminal that keeps nothing (a StringIO's growing buffer would be measured too)."""

    def write(self, text: str) -> int:
        return len(text)


def test_text_view_in_a_terminal_copies_only_what_is_new(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("nbtask.notebook.widgets._MIN_INTERVAL", 0.0)  # repaint each event
    monkeypatch.setattr("sys.stdout", Discard())
    view = TextView(TaskHandle(None, "t", "x"), "label", in_kernel=False)
    view.apply(Event(EventType.STARTED, "t", 1, {"worker": "host", "pid": 1}))
    piece = "." * 999 + "\n"
    peaks = []
    tracemalloc.start()
    try:
        for seq in range(2, 1002):  # 1 MB printed, a repaint after each kB
            event = Event(EventType.STDOUT, "t", seq, {"text": piece})
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            view.apply(event)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert view.paints > 1000
    # Keeping the text joined at each repaint copied all of it (the last ones 1 MB).
    assert max(peaks) < 10 * len(piece), max(peaks)
    assert view.text == piece * 1000


def test_a_view_says_how_long_a_task_ran_only_when_it_knows() -> None:
    ran = TextView(TaskHandle(None, "t", "x"), "ran", in_kernel=False)
    for event in (
        Event(EventType.STARTED, "t", 1, {"worker": "host", "pid": 1}, 100.0),
        Event(EventType.SUCCESS, "t", 2, {"started_at": 100.0}, 102.5),
    ):
        ran.apply(event)
        ran.handle.apply(event)
    assert ran.timing_text() == "2.5 s · host pid 1"
    # Ended with no start known (revoked before it ran): no time, rather than 0.0 s.
    never = TextView(TaskHandle(None, "u", "x"), "never", in_kernel=False)
    revoke = Event(EventType.REVOKED, "u", 1, {"reason": "revoked"}, 103.0)
    never.apply(revoke)
    never.handle.apply(revoke)
    assert never.timing_text() == "" and " s" not in never.status_text()
    # A %tasks row of a task without a view tells the same from the task's handle.
    assert Row(ran.handle, "ran", None).cells()[4] == ran.elapsed_text() == "2.5 s"
    assert Row(never.handle, "never", None).cells()[4] == never.elapsed_text() == ""


def test_progress_counts_read_in_full_never_in_exponent_notation() -> None:
    """``nbtask.track(range(10**7))``: counts past a million, sent as floats."""
    view = TextView(TaskHandle(None, "t", "x"), "crunch", in_kernel=False)
    for event in (
        Event(EventType.STARTED, "t", 1, {"worker": "host", "pid": 1}),
        Event(EventType.PROGRESS, "t", 2, {"done": 1288990.0, "total": 1e7}),
    ):
        view.apply(event)
        view.handle.apply(event)
    assert view.status_text().startswith("[crunch] STARTED 1,288,990/10,000,000"), (
        view.status_text()
    )
    assert Row(view.handle, "crunch", None).cells()[2].startswith("1,288,990/10,000,000")
    assert count_text(1 / 3, 1) == "0.3333/1" and count_text(2.5) == "2.5"
    assert count_text(1234567.891) == "1,234,568" and count_text(1e-7) == "0.0000001"


def test_notebook_group_is_stable_per_notebook() -> None:
    one = notebook_group({"JPY_SESSION_NAME": "/home/u/a.ipynb"})
    assert one == notebook_group({"JPY_SESSION_NAME": "/home/u/a.ipynb"}, cwd="/elsewhere")
    assert one != notebook_group({"JPY_SESSION_NAME": "/home/u/b.ipynb"})
    assert notebook_group({}, cwd="/x") == notebook_group({}, cwd="/x") != one


class Outer:
    class Inner(Exception):
        pass


def test_exception_types_are_found_by_module_and_qualname() -> None:
    import statistics

    assert exception_type("statistics.StatisticsError", "StatisticsError", {}) is (
        statistics.StatisticsError
    )
    assert exception_type(f"{__name__}.Outer.Inner", "Inner", {}) is Outer.Inner
    assert exception_type("builtins.KeyError", "KeyError", {}) is KeyError
    mine = type("Mine", (Exception,), {})
    assert exception_type("__main__.Mine", "Mine", {"Mine": mine}) is mine
    assert exception_type("nowhere.at.All", "All", {}) is None
    assert exception_type("m.f.<locals>.E", "E", {}) is None
    assert exception_type(None, "ValueError", {}) is ValueError
    assert exception_type("os.path", "path", {}) is None  # not an exception type
