"""What a ``--wait`` cell shows while its task runs: its output as it comes, a progress line."""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from IPython.display import clear_output, display, publish_display_data

from nbtask._text import count_text
from nbtask.notebook.carried import share_value
from nbtask.notebook.follow import Stopping, cancel_task, follow, next_event, one_line
from nbtask.notebook.kept import RemoteValue
from nbtask.wire.events import FINAL_STATES, Event, EventType

if TYPE_CHECKING:
    from nbtask.core.handle import TaskHandle

__all__ = ["ProgressLine", "follow_to_the_end", "out_value", "show_after_out", "show_output"]

#: How long a waiting cell waits for an event before it looks at its deadline and says
#: why the task waits.
_WAIT_TICK = 0.1
#: What a cell shows in its output area (not its progress line).
_OUTPUT = frozenset({EventType.STDOUT, EventType.STDERR, EventType.DISPLAY})


def follow_to_the_end(
    handle: TaskHandle, label: str, shell: Any, timeout: float | None, stopping: Stopping
) -> tuple[dict[str, Any] | None, list[Event]]:
    """Show a ``--wait`` cell's output and progress until its task ends.

    Stop (counted by ``stopping``) interrupts the task, which is followed on to its end,
    its output shown as it comes: its code may handle the interrupt, and its cleanup takes
    the time it takes. A second Stop kills it; the wait ends once the task is reported
    ended, or when :meth:`Stopping.act` says to stop waiting.

    Returns the worker's display of the cell's last expression, if it showed one, and the
    output the worker's cell made after it (the figures its inline backend draws once the
    cell has run), for :func:`show_after_out`: locally, those come after the ``Out``.

    Raises
    ------
    TimeoutError
        Past ``timeout`` seconds (unless Stop was pressed first: the user then decides):
        the task is cancelled, and the error says why it waited.
    """
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    follow(handle, events.put)
    line = ProgressLine(label, shell)
    result: dict[str, Any] | None = None
    later: list[Event] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not stopping.act():
            # Checked before each event, not only when none came for a while: a task
            # that prints every few milliseconds must time out all the same.
            late = deadline is not None and time.monotonic() > deadline
            if late and not stopping.interrupted and not handle.done():
                error = _timed_out(handle, label, timeout)  # says why, before cancelling
                cancel_task(handle)
                raise error from None
            try:
                event = next_event(handle, events, _WAIT_TICK)
            except queue.Empty:
                said = _stopping_reason(stopping)
                if said:
                    line.say(said)
                else:
                    line.waiting(handle.waiting_reason)
                continue
            if event.type is EventType.PROGRESS:
                line.show(event)
            elif result is not None and event.type in _OUTPUT:
                later.append(event)
            else:
                result = show_output(event) or result
            if event.state in FINAL_STATES:
                break
    finally:
        line.close()
    return result, later


def _stopping_reason(stopping: Stopping) -> str | None:
    """What the progress line says once Stop was pressed: what the task is left to do."""
    if stopping.killed:
        return "killed at the second Stop; waiting for its worker to say so"
    if stopping.interrupted:
        return "interrupted; waiting for it to end (press Stop again to kill it)"
    return None


def show_after_out(shell: Any, events: list[Event]) -> None:
    """Show ``events`` once the running cell has shown its ``Out`` (as the cell ends).

    The kernel shows a cell's ``Out`` when the magic returns, so what the worker's cell
    made after its last expression waits for the kernel's ``post_execute``, where the
    inline backend would have drawn it locally.
    """
    if not events:
        return
    if shell is None or getattr(shell, "events", None) is None:
        for event in events:
            show_output(event)
        return

    def show_once() -> None:
        shell.events.unregister("post_execute", show_once)
        for event in events:
            show_output(event)

    shell.events.register("post_execute", show_once)


def _timed_out(handle: TaskHandle, label: str, timeout: float | None) -> TimeoutError:
    """A ``--wait --timeout`` cell's error, saying why it waited."""
    reason = handle.waiting_reason
    text = f"task {label!r} did not finish within {timeout} s; cancelled"
    return one_line(TimeoutError(text + (f" (it was waiting: {reason})" if reason else "")))


class _Result:
    """The worker's display of a ``--wait`` cell's last expression, shown as its ``Out``.

    Only where the value itself cannot come back (it cannot be pickled).
    """

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundle = bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        metadata = dict(self.bundle.get("metadata", {}))
        metadata.pop("nbtask", None)
        return dict(self.bundle.get("data", {})), metadata

    def __repr__(self) -> str:
        return str(self.bundle.get("data", {}).get("text/plain", ""))


def out_value(
    shown: Any,
    bundle: dict[str, Any] | None,
    namespace: MutableMapping[str, Any],
    on_kept: Callable[[RemoteValue], None],
    out: str,
) -> Any:
    """What a ``--wait`` cell returns, so that its ``Out``, ``_`` hold what they would locally.

    The value of the cell's last expression (``shown``, as the worker sent it, after the
    cell's names were written into ``namespace``), which the kernel then shows with its
    own formatters; a value kept on the workers is its reference (its preview shown, and
    fetched when a cell reads it), as for an assigned name. One that cannot come back
    (it cannot be pickled, or loaded here) is the worker's display of it (``bundle``),
    and one line says so. ``None``: the cell shows nothing (``;``, or a ``None`` value).
    """
    if shown is None:  # none, or a worker that sends its display only
        return _worker_display(bundle)
    how, what = shown
    why = str(what)
    if how == "name" and what in namespace:
        return namespace[what]
    if how == "value":
        try:
            value = what.load()
        except Exception as exc:  # a class only the worker can import, say
            why = f"it cannot be loaded here: {type(exc).__name__}: {exc}"
        else:
            if isinstance(value, RemoteValue):
                on_kept(value)
            return share_value(namespace, value)
    elif how == "name":
        why = f"{what} is not defined in the notebook"
    said = "it shows the worker's display of the value" if bundle else "it shows nothing"
    print(f"nbtask: {out} did not come back from the worker ({why}): {said}", file=sys.stderr)
    return _worker_display(bundle)


def _worker_display(bundle: dict[str, Any] | None) -> _Result | None:
    """The worker's display of the last expression, shown in its stead.

    Its formatters' failures (a ``__repr__`` that raises) are shown first: locally, the
    kernel's formatters would have failed so, and shown the same.
    """
    if bundle is None:
        return None
    failed = bundle.get("metadata", {}).get("nbtask", {}).get("format_error")
    if failed:
        sys.stderr.write(str(failed))
    return _Result(bundle) if bundle.get("data") else None


def show_output(event: Event) -> dict[str, Any] | None:
    """Show one output event in the running cell, as the cell would locally.

    Returns the cell's last expression (a display bundle) when the event carries it.
    """
    if event.type in (EventType.STDOUT, EventType.STDERR):
        # Not flushed here: the kernel sends a stream's text as it does for a local cell
        # (at its flush interval, and before any display), so a line printed in two
        # pieces is one output, as locally.
        stream = sys.stdout if event.type is EventType.STDOUT else sys.stderr
        stream.write(str(event.data.get("text", "")))
    elif event.type is EventType.DISPLAY:
        data = dict(event.data)
        if data.get("metadata", {}).get("nbtask", {}).get("execute_result"):
            return data
        if data.get("clear"):
            clear_output(wait=bool(data.get("wait")))
        else:  # display ids too: an update replaces the display, as locally
            publish_display_data(
                data.get("data", {}),
                data.get("metadata", {}),
                transient=data.get("transient") or None,
                update=bool(data.get("update")),
            )
    return None


class ProgressLine:
    """A transient progress line under a ``--wait`` cell, gone when the cell ends.

    Before the task starts, it says why the task waits, if nbtask can tell.
    """

    def __init__(self, label: str, shell: Any) -> None:
        self.label = label
        self.in_kernel = "IPKernelApp" in getattr(shell, "config", {})
        self.handle: Any = None
        self.last = 0.0
        self.why = ""

    def show(self, event: Event) -> None:
        """Show a progress event (at most 15 times a second)."""
        now = time.monotonic()
        if now - self.last < 1 / 15:
            return
        self.last = now
        progress = event.progress
        if progress is None:
            return
        count = count_text(progress.done, progress.total)
        self._put(f"[{self.label}] {count} {progress.message}".rstrip())

    def waiting(self, why: str | None) -> None:
        """Say why the task waits (``None``: it does not, or it cannot be told); on change."""
        if (why or "") == self.why:
            return
        self.why = why or ""
        if why:
            self._put(f"[{self.label}] waiting: {why}")
        elif self.in_kernel:
            self._put("")

    def say(self, text: str) -> None:
        """Say ``text`` (what Stop left the task to do); on change."""
        if text == self.why:
            return
        self.why = text
        self._put(f"[{self.label}] {text}")

    def _put(self, text: str) -> None:
        if not self.in_kernel:
            sys.stderr.write(text + "\n")
        elif self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)

    def close(self) -> None:
        """Clear the line: the saved notebook keeps only the cell's own output."""
        if self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)
