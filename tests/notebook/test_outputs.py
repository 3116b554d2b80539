"""A task's output in its widget: what reaches the frontend, chunk by chunk.

A unit test has no frontend: the comm that ipywidgets opens per widget is replaced by one
that records what would cross to the frontend (the kernel side is the real ipywidgets).
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from functools import partial
from typing import Any

import comm
import pytest
from comm.base_comm import BaseComm
from helpers import display_event as display

from nbtask.core.handle import TaskHandle
from nbtask.notebook.outputs import _MAX_CHUNK, ChunkedOutput, OutputLog, StreamText
from nbtask.notebook.widgets import TaskWidget
from nbtask.wire.events import Event, EventType


class Frontend:
    """What the kernel sent to the frontend: each comm message, and each widget's state."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, dict[str, Any]]] = []  # (kind, comm id, data)
        self.state: dict[str, dict[str, Any]] = {}
        self.closed: set[str] = set()

    def outputs_bytes(self) -> int:
        """Bytes of every ``outputs`` value sent so far (Output widgets' content)."""
        return sum(
            len(json.dumps(data["state"]["outputs"]))
            for _kind, _id, data in self.messages
            if "outputs" in data.get("state", {})
        )

    def all_bytes(self) -> int:
        return sum(len(json.dumps(data)) for _kind, _id, data in self.messages)

    def shown(self, model_id: str) -> list[dict[str, Any]]:
        """The outputs a frontend shows under a widget, walking boxes as it renders them."""
        state = self.state[model_id]
        if "outputs" in state:
            return list(state["outputs"])
        children = [c.removeprefix("IPY_MODEL_") for c in state.get("children", [])]
        return [output for child in children for output in self.shown(child)]


class RecordingComm(BaseComm):
    def __init__(self, frontend: Frontend, *args: Any, **kwargs: Any) -> None:
        self.frontend = frontend  # set first: the base class opens the comm at once
        super().__init__(*args, **kwargs)

    def publish_msg(self, msg_type: str, data: Any = None, *_: Any, **__: Any) -> None:
        data = json.loads(json.dumps(data or {}))  # as it crosses: JSON
        self.frontend.messages.append((msg_type, self.comm_id, data))
        if msg_type == "comm_close":
            self.frontend.closed.add(self.comm_id)
        elif "state" in data:  # comm_open, or an update
            self.frontend.state.setdefault(self.comm_id, {}).update(data["state"])


@pytest.fixture
def frontend(monkeypatch: pytest.MonkeyPatch) -> Iterator[Frontend]:
    seen = Frontend()

    def create_comm(*args: Any, **kwargs: Any) -> BaseComm:
        return RecordingComm(seen, *args, **kwargs)

    monkeypatch.setattr(comm, "create_comm", create_comm)
    yield seen


def out(seq: int, text: str, stream: EventType = EventType.STDOUT) -> Event:
    return Event(stream, "t", seq, {"text": text})


def merged(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text of one stream as one output, as a kernel's frontend merges it."""
    result: list[dict[str, Any]] = []
    for output in outputs:
        last = result[-1] if result else None
        if (
            last is not None
            and output["output_type"] == last["output_type"] == "stream"
            and output["name"] == last["name"]
        ):
            result[-1] = {**last, "text": last["text"] + output["text"]}
        else:
            result.append(output)
    return result


def lines(seq: int, width: int = 100, count: int = 10) -> str:
    """``count`` numbered lines of ``width`` characters: about what one repaint brings."""
    return "".join(f"{seq:>6} {i:>3} ".ljust(width - 1, ".") + "\n" for i in range(count))


def test_a_widget_sends_output_in_bytes_linear_in_what_was_printed(
    frontend: Frontend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("nbtask.notebook.widgets._MIN_INTERVAL", 0.0)  # repaint each event
    widget = TaskWidget(TaskHandle(None, "t", "x"), "loop")
    widget.apply(Event(EventType.STARTED, "t", 1, {"worker": "host", "pid": 1}))
    printed = ""
    for seq in range(2, 602):  # 600 repaints of 1 kB: 600 kB printed
        text = lines(seq)
        printed += text
        widget.apply(out(seq, text))
    widget.apply(Event(EventType.SUCCESS, "t", 700, {}))
    assert widget.paints >= 600
    # One Output resent whole at each repaint sent ~180 MB here (300 times the text).
    sent = frontend.outputs_bytes()
    assert sent < 4 * len(printed), (sent, len(printed))
    # The frontend shows the same output, in order, and the log stays the one model.
    shown = frontend.shown(widget.box.model_id)
    assert merged(shown) == widget.log.outputs and widget.log.text() == printed


def feed(chunked: ChunkedOutput, *events: Event) -> None:
    for event in events:
        chunked.add(event)
    chunked.sync()


def test_display_updates_resend_only_the_displays_chunk(frontend: Frontend) -> None:
    chunked = ChunkedOutput(OutputLog())
    feed(chunked, display(1, "bar 0", "bar"), out(2, "between\n"), display(3, "plain"))
    for seq in range(4, 200):
        feed(chunked, out(seq, lines(seq)))
    feed(chunked, display(200, "late 0", "late"), display(201, "twice 0", "twice"))
    feed(chunked, out(202, lines(202)), display(203, "twice again", "twice"))
    assert len(chunked.chunks) > 10
    before = len(frontend.messages)
    feed(chunked, display(204, "bar 1", "bar", update=True))
    sent = [data for _k, _id, data in frontend.messages[before:]]
    assert [data["state"]["outputs"] for data in sent] == [
        [{"output_type": "display_data", "data": {"text/plain": "bar 1"}, "metadata": {}}]
    ]
    # Updates to displays on either side of frozen chunks, one shown twice, all land.
    feed(
        chunked,
        display(205, "late 1", "late", update=True),
        display(206, "twice 1", "twice", update=True),
        display(207, "nowhere", "nope", update=True),
    )
    shown = merged(frontend.shown(chunked.box.model_id))
    assert shown == chunked.log.outputs
    plain = [o["data"]["text/plain"] for o in shown if o["output_type"] == "display_data"]
    assert plain == ["bar 1", "plain", "late 1", "twice 1", "twice 1"]
    assert shown[1]["text"] == "between\n"
    assert shown[3]["text"] == "".join(lines(seq) for seq in range(4, 200))


def test_clear_output_empties_every_chunk_and_output_starts_afresh(frontend: Frontend) -> None:
    chunked = ChunkedOutput(OutputLog())
    for seq in range(1, 100):
        feed(chunked, out(seq, lines(seq)), out(seq, "warn\n", EventType.STDERR))
    feed(chunked, display(100, "progress", "p"))
    old = [chunk.model_id for chunk in chunked.chunks]
    assert len(old) > 2
    feed(chunked, Event(EventType.DISPLAY, "t", 101, {"clear": True}))
    assert frontend.shown(chunked.box.model_id) == [] == chunked.log.outputs
    assert set(old[1:]) <= frontend.closed  # the emptied chunks are gone from the page
    # What comes after a clear (here in the same repaint) shows from the top again.
    feed(
        chunked,
        Event(EventType.DISPLAY, "t", 102, {"clear": True}),
        out(103, "after\n"),
        display(104, "stale", "p", update=True),  # its display was cleared: nothing
    )
    assert frontend.shown(chunked.box.model_id) == chunked.log.outputs
    assert chunked.log.text() == "after\n"
    for seq in range(105, 200):
        feed(chunked, out(seq, lines(seq)))
    assert merged(frontend.shown(chunked.box.model_id)) == chunked.log.outputs
    assert chunked.log.text() == "after\n" + "".join(lines(seq) for seq in range(105, 200))


def test_a_long_line_is_cut_only_without_carriage_returns(frontend: Frontend) -> None:
    chunked = ChunkedOutput(OutputLog())
    for seq in range(1, 60):
        feed(chunked, out(seq, "." * 1000))  # one line, no newline yet
    assert len(chunked.chunks) > 1
    assert "".join(o["text"] for o in chunked.shown()) == "." * 59_000
    bar = ChunkedOutput(OutputLog())
    for seq in range(1, 60):
        feed(bar, out(seq, f"\r{seq:>3}% " + "#" * 1000))
    assert len(bar.chunks) == 1  # a \r must still overwrite what came before it
    assert merged(frontend.shown(bar.box.model_id)) == bar.log.outputs


def test_the_kernel_copies_only_what_is_new_or_shown(frontend: Frontend) -> None:
    chunked = ChunkedOutput(OutputLog())
    adds: list[int] = []  # bytes each event allocates in the log, at its peak
    repaints: list[int] = []  # and each repaint after it
    tracemalloc.start()
    try:
        for seq in range(1, 1001):  # 1 MB printed in 1 kB events, a repaint after each
            for step, peaks in (
                (partial(chunked.add, out(seq, lines(seq))), adds),
                (chunked.sync, repaints),
            ):
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                step()
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    # Merging by ``text + piece`` allocates the stream's whole text at each event (the
    # last ones 1 MB): CPU quadratic in the output. A repaint reads its open chunk only.
    assert max(adds) < 10 * len(lines(0)), max(adds)
    assert max(repaints) < 8 * _MAX_CHUNK, max(repaints)
    assert chunked.log.text() == "".join(lines(seq) for seq in range(1, 1001))
    assert merged(frontend.shown(chunked.box.model_id)) == chunked.log.outputs


def test_stream_text_reads_spans_across_its_pieces() -> None:
    pieces = ["ab\n", "", "c", "de\nf", "\n", "ghi"]
    text = StreamText(pieces[0])
    for piece in pieces[1:]:
        text.append(piece)
    whole = "".join(pieces)
    assert len(text) == len(whole)
    spans = {(a, b): text.span(a, b) for a in range(len(whole) + 1) for b in range(len(whole) + 2)}
    assert spans == {(a, b): whole[a:b] for a, b in spans}
    assert [text.line_end(a) for a in range(len(whole) + 1)] == [
        max(whole.rfind("\n", a) + 1, a) for a in range(len(whole) + 1)
    ]
    assert str(text) == whole == text.span(0)
    text.append("!")  # after a read joins it, more still comes at the end
    assert str(text) == whole + "!" and text.span(len(whole) - 2) == "hi!"
