"""The progress of a large fetch into the notebook: bytes fetched out of the total.

A kept value read by a local cell or fetched with ``x.fetch()``, and a large result read by
``handle.get()``, can take seconds to arrive. From ``keep_threshold`` bytes on (the size
from which a cell's names stay on the workers) the fetch shows a bar: an ipywidgets bar in
a kernel whose frontend may show widgets, else a text bar on stderr, rewritten in place.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import ipywidgets as w
from IPython.display import display

from nbtask.notebook.widgets import widgets_enabled
from nbtask.wire.blobs import ByteProgress

__all__ = ["fetch_progress"]

_REDRAW_SECONDS = 0.2  # a bar redrawn per chunk would flood a slow frontend
_TEXT_WIDTH = 30


@contextlib.contextmanager
def fetch_progress(label: str, total: int, *, threshold: int, shell: Any) -> Iterator[ByteProgress]:
    """Show a bar for the fetch in the block; yield what to tell each batch of bytes.

    Parameters
    ----------
    label
        What is fetched (``x``, ``the result of total[1a2b3c4d]``).
    total
        Its size in bytes; below ``threshold`` nothing is shown.
    shell
        The IPython shell: in a kernel with widgets the bar is a widget.
    """
    if total < threshold:
        yield _ignore
        return
    bar: _WidgetBar | _TextBar = (
        _WidgetBar(label, total) if widgets_enabled(shell) else _TextBar(label, total, sys.stderr)
    )
    try:
        yield bar.advance
        bar.done = total  # all arrived: the small inline parts came with the reference
    finally:
        bar.close()


def _ignore(count: int) -> None:
    return None


def _mb(count: int) -> str:
    return f"{count / 1e6:,.1f}"


class _Bar:
    """Bytes counted, redrawn at most every :data:`_REDRAW_SECONDS`, and at the end."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self._drawn = 0.0

    def advance(self, count: int) -> None:
        self.done = min(self.total, self.done + count)
        now = time.monotonic()
        if now - self._drawn >= _REDRAW_SECONDS or self.done == self.total:
            self._drawn = now
            self.draw()

    def text(self) -> str:
        percent = 100 * self.done // max(1, self.total)
        return f"{_mb(self.done)} / {_mb(self.total)} MB ({percent}%)"

    def draw(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TextBar(_Bar):
    """``nbtask: fetching x [#####-----] 24.0 / 48.0 MB (50%)``, redrawn on one line."""

    def __init__(self, label: str, total: int, out: TextIO) -> None:
        super().__init__(label, total)
        self.out = out
        self.draw()

    def draw(self) -> None:
        filled = _TEXT_WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "-" * (_TEXT_WIDTH - filled)
        self.out.write(f"\rnbtask: fetching {self.label} [{bar}] {self.text()}")
        self.out.flush()

    def close(self) -> None:
        self.draw()
        self.out.write("\n")
        self.out.flush()


class _WidgetBar(_Bar):
    """An ipywidgets bar with the bytes beside it, left in the output when done."""

    def __init__(self, label: str, total: int) -> None:
        super().__init__(label, total)
        self.progress = w.FloatProgress(
            value=0.0, min=0.0, max=float(total), description="fetching"
        )
        self.note = w.Label(f"{label}: {self.text()}")
        display(w.HBox([self.progress, self.note]))

    def draw(self) -> None:
        self.progress.value = float(self.done)
        self.note.value = f"{self.label}: {self.text()}"

    def close(self) -> None:
        self.draw()
        self.progress.bar_style = "success" if self.done == self.total else "danger"
