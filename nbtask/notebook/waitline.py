"""What a ``--wait`` cell shows while its task runs: its output as it comes, a progress line."""

from __future__ import annotations

import sys
import time
from typing import Any

from IPython.display import clear_output, display, publish_display_data

from nbtask.wire.events import Event, EventType

__all__ = ["ProgressLine", "show_output"]


def show_output(event: Event) -> dict[str, Any] | None:
    """Show one output event in the running cell, as the cell would locally.

    Returns the cell's last expression (a display bundle) when the event carries it.
    """
    if event.type in (EventType.STDOUT, EventType.STDERR):
        stream = sys.stdout if event.type is EventType.STDOUT else sys.stderr
        stream.write(str(event.data.get("text", "")))
        stream.flush()
    elif event.type is EventType.DISPLAY:
        data = dict(event.data)
        if data.get("metadata", {}).get("nbtask", {}).get("execute_result"):
            return data
        if data.get("clear"):
            clear_output()
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
        total = f"/{progress.total:g}" if progress.total else ""
        self._put(f"[{self.label}] {progress.done:g}{total} {progress.message}".rstrip())

    def waiting(self, why: str | None) -> None:
        """Say why the task waits (``None``: it does not, or it cannot be told); on change."""
        if (why or "") == self.why:
            return
        self.why = why or ""
        if why:
            self._put(f"[{self.label}] waiting: {why}")
        elif self.in_kernel:
            self._put("")

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
