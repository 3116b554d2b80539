"""Live views of a task under a cell: an ipywidgets :class:`TaskWidget` or a text fallback.

A view changes only through :meth:`TaskView.apply`, called with each event of its task
(from the listener thread). Events update a plain model at once; the screen is repainted
at most ~15 times a second per task (a timer catches the last change) and the final state
is painted immediately, so it is never dropped. Painting happens under one lock per view,
so each widget has a single writer (two threads writing one widget can reorder updates).
"""

from __future__ import annotations

import html
import sys
import threading
import time
from typing import Any

import ipywidgets as w
from IPython.display import display

from nbtask._text import count_text
from nbtask.core.handle import TaskHandle
from nbtask.notebook.follow import cancel_task
from nbtask.notebook.outputs import ChunkedOutput, OutputLog
from nbtask.notebook.remote_errors import failure_output
from nbtask.notebook.textchunks import CellChunks, as_latest_request, following_request
from nbtask.settings import env_flag
from nbtask.wire.events import FINAL_STATES, Event, EventType, State

__all__ = [
    "TaskView",
    "TaskWidget",
    "TextView",
    "duration",
    "duration_text",
    "make_view",
    "widgets_enabled",
]

_MIN_INTERVAL = 1 / 15
_COLORS = {
    State.PENDING: "#888",
    State.STARTED: "#1f77b4",
    State.RETRY: "#ff7f0e",
    State.SUCCESS: "#2ca02c",
    State.FAILURE: "#d62728",
    State.REVOKED: "#7f7f7f",
    State.WORKER_LOST: "#d62728",
}


class TaskView:
    """What every view shows, kept as plain data; subclasses paint it.

    Parameters
    ----------
    handle
        The task shown.
    label
        How the task is named on screen (the cell's name or first line).
    """

    def __init__(self, handle: TaskHandle, label: str) -> None:
        self.handle = handle
        self.label = label
        self.state = State.PENDING
        self.done = 0.0
        self.total: float | None = None
        self.message = ""
        self.worker = ""
        self.pid = ""
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.error = ""
        #: How a kernel would show the task's failure (an nbformat ``error`` output, its
        #: traceback IPython's coloured lines when the worker sent them), once it failed.
        self.failure: dict[str, Any] | None = None
        #: Why the task waits, while it is PENDING (or STARTED by a worker that is gone)
        #: and nbtask can tell (see :attr:`TaskHandle.waiting_reason`); empty otherwise.
        self.waiting = handle.waiting_reason or ""
        self.result: dict[str, Any] | None = None
        self.pending_output: list[Event] = []
        self.paints = 0
        self._lock = threading.RLock()
        self._last_paint = 0.0
        self._timer: threading.Timer | None = None
        self._rate_start: tuple[float, float] | None = None

    def apply(self, event: Event) -> None:
        """Update the model from one event and repaint (throttled; final states at once)."""
        with self._lock:
            self._update(event)
            final = event.state in FINAL_STATES
            now = time.monotonic()
            if final or now - self._last_paint >= _MIN_INTERVAL:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._repaint()
            elif self._timer is None:
                self._timer = threading.Timer(_MIN_INTERVAL - (now - self._last_paint), self._late)
                self._timer.daemon = True
                self._timer.start()

    def _late(self) -> None:
        with self._lock:
            self._timer = None
            self._repaint()

    def _repaint(self) -> None:
        self._last_paint = time.monotonic()
        self.paints += 1
        self.paint()
        self.pending_output = []

    def _update(self, event: Event) -> None:
        self._update_state(event)
        data = event.data
        if event.type is EventType.PROGRESS:
            self.done = float(data.get("done", 0.0))
            self.total = None if data.get("total") is None else float(data["total"])
            self.message = str(data.get("message", ""))
            if self._rate_start is None:
                self._rate_start = (time.time(), self.done)
        elif event.type in (EventType.STDOUT, EventType.STDERR):
            self.pending_output.append(event)
        elif event.type is EventType.DISPLAY:
            own = dict(data.get("metadata", {})).get("nbtask", {})
            if own.get("execute_result") and own.get("format_error"):
                # Its formatters failed on the worker: shown as they would be locally.
                text = {"text": str(own["format_error"])}
                self.pending_output.append(Event(EventType.STDERR, event.task_id, event.seq, text))
            if own.get("execute_result") and data.get("data"):
                self.result = dict(data)
            else:
                self.pending_output.append(event)

    def _update_state(self, event: Event) -> None:
        data = event.data
        if event.state is not None:
            self.state = event.state
        if self.state is not State.PENDING:
            self.waiting = ""
        if "worker" in data:
            self.worker = str(data["worker"])
        if "pid" in data:
            self.pid = str(data["pid"])
        if event.type is EventType.STARTED and self.started is None:
            self.started = event.timestamp or time.time()
        if event.state in FINAL_STATES:
            # The worker's clock for both ends: a task that ended before its ``started``
            # event went out says when it started in its final event.
            self.finished = event.timestamp or time.time()
            # Left unknown when nothing says it (it never ran): no time is shown then.
            if self.started is None:
                began = data.get("started_at")
                self.started = float(began) if isinstance(began, (int, float)) else None
            if event.type is not EventType.SUCCESS:
                self.error = str(data.get("traceback") or "") or (
                    f"{data.get('ename', event.type.value)}: "
                    f"{data.get('evalue', data.get('reason', ''))}"
                )
            if event.type is EventType.FAILURE:
                self.failure = failure_output(event)

    def shows_end(self) -> bool:
        """Whether the task's final state is applied and painted (read under the paint's lock)."""
        with self._lock:
            return self.finished is not None

    # Derived text --------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the task started (or was sent), up to when it finished.

        0 for a task that ended with no known start: see :meth:`elapsed_text`.
        """
        return duration(self.started, self.finished, self.created) or 0.0

    def elapsed_text(self) -> str:
        """``12.3 s``; empty for a task that ended with no known start (it never ran)."""
        return duration_text(self.started, self.finished, self.created)

    def eta(self) -> float | None:
        """Seconds left at the rate seen so far, if a total is known."""
        if self._rate_start is None or not self.total or self.finished:
            return None
        began, done0 = self._rate_start
        rate = (self.done - done0) / max(time.time() - began, 1e-9)
        return None if rate <= 0 else max(0.0, (self.total - self.done) / rate)

    def progress_text(self) -> str:
        """``3/10 message, ETA 4 s`` (empty without progress)."""
        if self._rate_start is None:
            return ""
        count = count_text(self.done, self.total)
        eta = self.eta()
        parts = [count, self.message, f"ETA {eta:.0f} s" if eta is not None else ""]
        return " ".join(p for p in parts if p)

    def detail_text(self) -> str:
        """``waiting: <why>`` while the task waits for a worker, else :meth:`progress_text`."""
        return f"waiting: {self.waiting}" if self.waiting else self.progress_text()

    def status_text(self) -> str:
        """One line: label, state, progress (or why it waits), elapsed, worker."""
        pid = f" pid {self.pid}" if self.pid else ""
        where = f" on {self.worker}{pid}" if self.worker else ""
        progress = self.detail_text()
        return (
            f"[{self.label}] {self.state.value}"
            + "".join(f" {part}" for part in (progress, self.elapsed_text()) if part)
            + where
        )

    def end_text(self) -> str:
        """How the task ended, as text: its error (a traceback), else its result's text."""
        if self.error:
            return self.error
        return str(self.result.get("data", {}).get("text/plain", "")) if self.result else ""

    def timing_text(self) -> str:
        """``12.3 s · host pid 123``."""
        where = f" · {self.worker} pid {self.pid}" if self.worker else ""
        return (self.elapsed_text() + where).removeprefix(" · ")

    def tick(self) -> None:
        """Show the elapsed time of an unfinished task anew (called about once a second).

        Between events only that changes, and, for a task still PENDING, whether it
        waits for a worker of its queue (for one STARTED, whether its worker is gone):
        the view repaints whole when that changes.
        """
        # Read outside the lock: now and then it reads the worker registry.
        asks = self.state in (State.PENDING, State.STARTED)  # not started, or its worker gone
        waiting = (self.handle.waiting_reason or "") if asks else ""
        with self._lock:
            if self.finished is not None:
                return
            if asks and waiting != self.waiting:
                self.waiting = waiting
                self._repaint()
            else:
                self._tick()

    def _tick(self) -> None:
        """Repaint the timing; called with the view's lock held."""

    def paint(self) -> None:
        """Show the model; called with the view's lock held."""
        raise NotImplementedError


class TaskWidget(TaskView):
    """The ipywidgets view: badge, progress bar, timing, worker, output, result, Cancel.

    The output goes to the frontend chunk by chunk (:class:`ChunkedOutput`): a repaint
    sends what changed, not everything printed so far.

    Display it with :meth:`show` (or ``display(widget)``); feed it with :meth:`apply` (or
    :func:`follow`). Shown so, its display is updated once the task ends, so that a notebook
    saved then keeps the end as text beside the widget (see :meth:`saved_text`).
    """

    def __init__(self, handle: TaskHandle, label: str) -> None:
        super().__init__(handle, label)
        self.badge = w.HTML()
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="40%"))
        self.detail = w.Label()
        self.timing = w.Label()
        self.log = OutputLog()
        #: The output so far, as Output widgets sent chunk by chunk (see ChunkedOutput).
        self.output = ChunkedOutput(self.log)
        self.outcome = w.Output()
        self.cancel_button = w.Button(description="Cancel", button_style="warning")
        self.cancel_button.on_click(self._on_cancel)
        head = w.HBox([self.badge, self.bar, self.detail, self.cancel_button])
        self.box = w.VBox([head, self.timing, self.output.box, self.outcome])
        self._display: Any = None  # its display, to update with the end once (see show())
        with self._lock:
            self._repaint()

    def show(self) -> None:
        """Display the widget under the cell running now."""
        self._display = display(self, display_id=True)

    def _on_cancel(self, _button: Any) -> None:
        self.cancel_button.disabled = True
        self.cancel_button.description = "Cancelling"
        cancel_task(self.handle)

    def paint(self) -> None:
        """Push the model into the widgets, as one message per widget."""
        with self.bar.hold_sync():  # value, max and style in one message
            if self.total:
                self.bar.max = self.total
                self.bar.value = min(self.done, self.total)
            elif self.state is State.SUCCESS:
                self.bar.value = self.bar.max
            self.bar.bar_style = {State.SUCCESS: "success", State.FAILURE: "danger"}.get(
                self.state, ""
            )
        self.detail.value = self.detail_text()
        self.timing.value = self.timing_text()
        for event in self.pending_output:
            self.output.add(event)
        self.output.sync()  # only the chunks that changed
        if self.finished is not None:
            self.cancel_button.layout.display = "none"
            if not self.outcome.outputs and self.failure is not None:
                self.outcome.outputs = (self.failure,)  # the frontend colours it
            elif not self.outcome.outputs and self.error:
                self.outcome.outputs = (
                    {"output_type": "stream", "name": "stderr", "text": self.error},
                )
            elif not self.outcome.outputs and self.result is not None:
                self.outcome.outputs = (
                    {
                        "output_type": "display_data",
                        "data": self.result.get("data", {}),
                        "metadata": {},
                    },
                )
        # The badge goes last: when it reads SUCCESS, everything else is already shown.
        color = _COLORS.get(self.state, "#888")
        self.badge.value = (
            f'<b>{html.escape(self.label)}</b> <span style="background:{color};color:white;'
            f'padding:1px 6px;border-radius:3px">{self.state.value}</span>'
        )
        if self.finished is not None and self._display is not None:
            # The frontend keeps the text of the display's last update in the notebook it
            # saves: the end, not the state the task was in when it was first shown.
            display_handle, self._display = self._display, None
            with as_latest_request():
                display_handle.update(self)

    def _tick(self) -> None:
        self.timing.value = self.timing_text()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.box._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # frontends without widgets (a saved notebook) show it
            bundle["text/plain"] = self.saved_text()
        return bundle

    def saved_text(self) -> str:
        """The status line; once the task ended, its output and its result or error too."""
        if self.finished is None:
            return self.status_text()
        parts = [self.status_text(), self.log.text().rstrip("\n"), self.end_text().rstrip("\n")]
        return "\n".join(p for p in parts if p)


class TextView(TaskView):
    """Text fallback: a progress line, streamed output, then the result or traceback.

    In a kernel without widgets it keeps a status display up to date (so text lands under
    its own cell, not whichever cell runs now), the output below it: in displays of its own
    sent chunk by chunk where the frontend follows the cell (:mod:`.textchunks`), else in
    the status display; elsewhere (a terminal) it prints.
    """

    def __init__(
        self,
        handle: TaskHandle,
        label: str,
        *,
        in_kernel: bool,
        show: bool = True,
        shell: Any = None,
    ) -> None:
        super().__init__(handle, label)
        self.in_kernel = in_kernel
        self.quiet = not show  # keeps the text without showing it (a re-attached task)
        self.log = OutputLog()
        self._last_line = ""
        self._line_open = False  # a terminal: the task's output ends in the middle of a line
        self._display: Any = None
        self._chunks: CellChunks | None = None
        if in_kernel and show:
            self._display = display({"text/plain": self.status_text()}, raw=True, display_id=True)
            request = following_request(shell)
            if request is not None:
                self._chunks = CellChunks(self.log, shell, request)
        elif show and self.waiting:  # a terminal hears at once why the task waits
            with self._lock:
                self._repaint()

    @property
    def text(self) -> str:
        """The output so far as text (display updates replace what they update)."""
        with self._lock:  # reading joins the log's pieces, which a paint may be adding to
            return self.log.text()

    def paint(self) -> None:
        """Redraw the display, or print what is new."""
        chunks = []
        for event in self.pending_output:
            if self._chunks is not None:
                self._chunks.add(event)  # into the log, noting the displays it changes
            else:
                self.log.add(event)
            if event.type is not EventType.DISPLAY:
                chunks.append(str(event.data.get("text", "")))
            elif not event.data.get("clear"):  # a terminal cannot replace: print updates
                bundle = dict(event.data.get("data", {}))
                chunks.append(str(bundle.get("text/plain", "")) + "\n")
        new = "".join(chunks)
        tail = self.end_text() if self.finished is not None else ""
        if self.quiet:
            return
        if self._chunks is not None:
            self._chunks.sync()
            self._chunks.end(tail.rstrip("\n"))
            # The status goes last: when it reads SUCCESS, the output is all shown.
            self._display.update({"text/plain": self.status_text()}, raw=True)
            return
        if self._display is not None:
            parts = [self.status_text(), self.text.rstrip("\n"), tail]
            self._display.update({"text/plain": "\n".join(p for p in parts if p)}, raw=True)
            return
        out = sys.stdout
        line = self.status_text()
        if new:
            out.write(new)
            self._line_open = not new.endswith("\n")
        # A terminal gets a status line only when the state or the progress changes, and
        # not in the middle of a line the task prints in pieces (the last one ends it).
        key = f"{self.state.value} {self.detail_text()}"
        ended = self.finished is not None
        if (ended or key != self._last_line) and (ended or not self._line_open):
            out.write(("\n" if self._line_open else "") + line + "\n")
            self._last_line, self._line_open = key, False
        if tail:
            out.write(tail.rstrip("\n") + "\n")
        out.flush()

    def _tick(self) -> None:
        if self._display is not None:  # the status line shows the elapsed time
            self._repaint()


def duration(
    started: float | None, finished: float | None, sent: float | None = None
) -> float | None:
    """Seconds a task ran: from ``started`` up to ``finished``, or now while it runs.

    Before its start is known, a task that has not finished counts from ``sent`` if
    given. None when there is no start to count from (a task that ended without one
    never ran).

    Parameters
    ----------
    started, finished
        When the task started and ended (epoch seconds), once known.
    sent
        When it was sent, counted from while it has not started.
    """
    if started is None:
        if finished is not None or sent is None:
            return None
        started = sent
    return max(0.0, (finished or time.time()) - started)


def duration_text(started: float | None, finished: float | None, sent: float | None = None) -> str:
    """:func:`duration` as ``12.3 s``; empty when it is None."""
    seconds = duration(started, finished, sent)
    return "" if seconds is None else f"{seconds:.1f} s"


def widgets_enabled(shell: Any) -> bool:
    """True in a kernel (where a frontend may show widgets) unless ``NBTASK_WIDGETS`` is off.

    A kernel cannot tell whether its frontend renders widgets: set ``NBTASK_WIDGETS=0``
    (or ``false``/``no``/``off``, as every flag) for text views (nbconvert, consoles);
    widgets also carry a text status for frontends without them.
    """
    in_kernel = shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    return in_kernel and env_flag("NBTASK_WIDGETS", default=True)


def make_view(handle: TaskHandle, label: str, shell: Any = None, *, show: bool = True) -> TaskView:
    """The best view for where we run: a widget in a kernel, else text.

    A text view in a kernel displays itself unless ``show`` is false; a widget is shown
    by displaying it.
    """
    if widgets_enabled(shell):
        return TaskWidget(handle, label)
    in_kernel = shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    return TextView(handle, label, in_kernel=in_kernel, show=show, shell=shell)
