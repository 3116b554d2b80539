"""A task's text view under its cell, sent chunk by chunk where the frontend allows it.

A display is replaced whole by each update, so one display holding all a task printed
resends everything printed so far at every repaint: bytes quadratic in the output.
:class:`CellChunks` shows the output as a column of text displays instead, cut as the
widget's Output widgets are (:class:`~nbtask.notebook.outputs.Chunks`): only the last one
grows, a display the task updates by id has one of its own, and an update sends the
displays whose text changed. What reaches the frontend stays a small multiple of the text.

A new display can join a cell only where the frontend still listens to that cell after it
returned. An interactive frontend does (JupyterLab, Notebook: one that can answer
``input()``); a batch runner does not (nbclient, so nbconvert, papermill and ``nbtask
run``: they allow no input, and read a cell's messages only while it runs). There the text
view stays one display made while its cell ran and updated in place, the only output a
batch runner records under a cell that returned (see :func:`following_request`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from IPython import get_ipython
from IPython.display import display

from nbtask.notebook.outputs import Chunks, OutputLog, text_of

__all__ = ["CellChunks", "as_latest_request", "following_request", "note_latest_request"]


def following_request(shell: Any) -> dict[str, Any] | None:
    """The request of the cell running now, if its frontend shows what comes for it later.

    ``None`` outside an ipykernel kernel, and for a request that allows no input (a batch
    runner's; see the module's docstring).
    """
    kernel = getattr(shell, "kernel", None)
    publisher = getattr(shell, "display_pub", None)
    get_parent = getattr(kernel, "get_parent", None)
    if not callable(get_parent) or not hasattr(publisher, "set_thread_parent"):
        return None
    request = get_parent("shell")
    content = request.get("content") if isinstance(request, dict) else None
    return request if isinstance(content, dict) and content.get("allow_stdin") else None


#: The request of the cell that began last, as the main thread saw it (another thread
#: sees the request current when it was started: ipykernel keeps it per context).
_LATEST: dict[str, Any] = {}


def note_latest_request(shell: Any) -> None:
    """Note the request of the cell beginning now (on the main thread, as each cell begins)."""
    get_parent = getattr(getattr(shell, "kernel", None), "get_parent", None)
    if callable(get_parent):
        _LATEST["request"] = get_parent("shell")


@contextlib.contextmanager
def as_latest_request() -> Iterator[None]:
    """Send this thread's display messages as replies to the latest request noted.

    A frontend takes a display update only while the request it answers is the latest
    one (JupyterLab keeps listening to a request until the next cell runs; nbclient reads
    those of the running cell): a task ends while later cells run.
    """
    publisher: Any = getattr(get_ipython(), "display_pub", None)
    latest = _LATEST.get("request")
    if not latest or not hasattr(publisher, "set_thread_parent"):
        yield
        return
    token = publisher.set_thread_parent(latest)
    try:
        yield
    finally:
        publisher.reset_thread_parent(token)


class CellChunks(Chunks):
    """A task's output as text displays under one cell, each sent only when it changed.

    Feed it with :meth:`add`, send what changed with :meth:`sync`, then :meth:`end`.

    Parameters
    ----------
    log
        The model: every event goes into it, and the displays show it.
    shell
        The kernel's shell, whose display publisher sends the displays.
    request
        The request of the cell they belong under (:func:`following_request`): each is
        sent as that cell's output, whichever cell runs now.
    """

    def __init__(self, log: OutputLog, shell: Any, request: dict[str, Any]) -> None:
        super().__init__(log)
        self._publisher = shell.display_pub
        self._request = request
        self._handles: list[Any] = []
        self._texts: list[str] = []  # what each display shows
        self._end: int | None = None  # the display of the result or the error, once made

    def end(self, text: str) -> None:
        """Show ``text`` (the result or the error) in a display after the output."""
        if text and self._end is None:
            self._end = len(self._handles)
        if self._end is not None:
            self._put(self._end, text)

    def _made(self) -> int:
        return len(self._handles)

    def _show(self, j: int, outputs: list[dict[str, Any]]) -> None:
        for k in range(len(self._handles), j):  # not made yet, and left empty
            self._put(k, "")
        # One display is one block: the line break the text ends with is the block's end.
        self._put(j, "".join(map(text_of, outputs)).removesuffix("\n"))

    def _placed(self, count: int) -> None:
        for k in range(len(self._starts), len(self._handles)):  # emptied by a clear
            self._put(k, "")

    def _put(self, k: int, text: str) -> None:
        """Make display ``k`` showing ``text``, or update it if it shows something else."""
        with self._as_the_cell():
            if k == len(self._handles):
                self._handles.append(display({"text/plain": text}, raw=True, display_id=True))
                self._texts.append(text)
            elif self._texts[k] != text:
                self._handles[k].update({"text/plain": text}, raw=True)
                self._texts[k] = text

    @contextlib.contextmanager
    def _as_the_cell(self) -> Iterator[None]:
        """Send from this thread as the cell's own output, then as before."""
        token = self._publisher.set_thread_parent(self._request)
        try:
            yield
        finally:
            self._publisher.reset_thread_parent(token)
