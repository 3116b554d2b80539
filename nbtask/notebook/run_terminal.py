"""What ``nbtask run`` writes to the terminal as a notebook runs (:mod:`.headless`).

The cells' text output as the kernel produces it, and each task's text view updated in
place, reduced to what changed: a notebook's display updated in place has no equivalent in
a terminal, whose lines are only ever added.
"""

from __future__ import annotations

import re
import time
from typing import Any, TextIO

from nbtask.wire.events import FINAL_STATE_NAMES

__all__ = ["Terminal"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The text view's first line: "[label] STATE ..." (see nbtask.widgets.TextView).
_STATUS = re.compile(r"^\[(?P<label>[^\]]*)\] (?P<state>[A-Z_]+)\b")
_STATUS_INTERVAL = 1.0


class Terminal:
    """Writes a run's progress lines and the kernel's output messages to ``out``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.color = bool(getattr(out, "isatty", lambda: False)())
        self._displays: dict[str, tuple[str, str, float]] = {}  # id -> (status, body, time)
        self._line_start = True
        #: The task view whose output the open line ends with, if one does: its output goes
        #: on on that line, as the task printed it (``print(i, end="")``).
        self._open: str | None = None
        # A task view updated while a printed line is still open: shown once the line ends
        # (a print's pieces may come in several stream messages), never in the middle of it.
        self._held: dict[str, str] = {}  # display id -> its latest text

    def write(self, text: str, *, raw: bool = False) -> None:
        """Write a line (ended with a newline), or ``raw`` text as it comes (a stream)."""
        if not text:
            return
        if not self.color:
            text = _ANSI.sub("", text)
        if not raw:
            if not self._line_start:
                text = "\n" + text
            if not text.endswith("\n"):
                text += "\n"
        self.out.write(text)
        self.out.flush()
        self._line_start = text.endswith("\n")
        self._open = None

    def echo(self, msg: dict[str, Any]) -> None:
        """Write what a message from the kernel shows, as the notebook would show it."""
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "stream":
            if self._open is not None:  # a line a task view left open: not continued here
                self.write("\n", raw=True)
            self.write(str(content.get("text", "")), raw=True)
            if self._line_start:
                self.release_held()
            return
        display_id = (content.get("transient") or {}).get("display_id")
        data = content.get("data", {})
        in_place = display_id and kind == "update_display_data" and data.keys() == {"text/plain"}
        if in_place and not self._line_start and self._open is None:  # a printed line
            self._held[str(display_id)] = str(data["text/plain"])
            return
        self.release_held()
        if kind == "error":
            self.write("\n".join(content.get("traceback", [])))
        elif kind in ("execute_result", "display_data", "update_display_data"):
            text = data.get("text/plain")
            if text is not None and display_id and data.keys() == {"text/plain"}:
                self._echo_display(str(display_id), str(text), kind != "update_display_data")
            elif text is not None:
                self.write(str(text))
            elif data:
                self.write(f"[{', '.join(sorted(data))}]")

    def release_held(self) -> None:
        """Show the task views held back while a printed line was open."""
        held, self._held = self._held, {}
        for display_id, text in held.items():
            self._echo_display(display_id, text, new=False)

    def _echo_display(self, display_id: str, text: str, new: bool) -> None:
        """A display updated in place (a task's text view): print only what changed.

        Its first line is the task's status: printed when the state changes, at most once a
        second otherwise, and never in the middle of a line the task printed (until the
        task ends). The rest is output that only grows: printed as it grows, as the task
        printed it (a line printed in pieces stays one line).
        """
        status, _, body = text.partition("\n")
        old_status, old_body, last = self._displays.get(display_id, ("", "", 0.0))
        now = time.monotonic()
        going_on = self._open == display_id  # the open line is the end of its output
        if new or not body.startswith(old_body):
            old_body, going_on = "", False  # replaced, not appended to: show it whole
        added = body[len(old_body) :]
        old_state = _STATUS.match(old_status)
        state = _STATUS.match(status)
        changed = (state and state["state"]) != (old_state and old_state["state"])
        due = status != old_status and (changed or now - last >= _STATUS_INTERVAL)
        ended = state is not None and state["state"] in FINAL_STATE_NAMES
        if going_on and added.startswith("\n"):  # the line the view left open has ended
            self.write("\n", raw=True)
            added = added[1:]
        elif not going_on:
            added = added.lstrip("\n")
        if due and self._line_start and added and not ended:  # before the output after it
            self.write(status)
            old_status, last, due = status, now, False
        if added:
            if not self._line_start and not going_on:
                self.write("\n", raw=True)
            self.write(added, raw=True)
            # The view leaves its last line open: what ends it comes with the next update.
            self._open = display_id if not self._line_start else None
        if due and (self._line_start or ended):
            self.write(status)
            old_status, last = status, now
        self._displays[display_id] = (old_status, body, last)
