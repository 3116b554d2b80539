"""A task's output: the model (:class:`OutputLog`) and its widget (:class:`ChunkedOutput`).

ipywidgets sends an Output widget's whole ``outputs`` at each change, so a single Output
for all of a task's output would resend everything printed so far at every repaint: bytes
quadratic in the output. :class:`ChunkedOutput` shows the log as a column of Output
widgets ("chunks") instead. Only the last, open chunk grows; once resending it has cost
about twice what it holds (or it holds a lot), it is frozen at a line end and a new one
opens. A frozen chunk is sent again only when a display update replaces one of its
outputs, and a display with a display id gets a chunk of its own, so updating it resends
only itself. What reaches the frontend stays a small multiple of what the task printed.

The text view that stands in for the widget (``NBTASK_WIDGETS=0``) is cut the same way
(:class:`Chunks`), into text displays (:mod:`nbtask.notebook.textchunks`).

The kernel's work stays linear too: a stream keeps its text as the pieces it came in
(:class:`StreamText`), so adding text copies none of what came before, and a chunk reads
only its own span of it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

import ipywidgets as w

from nbtask.wire.events import Event, EventType

__all__ = ["ChunkedOutput", "Chunks", "OutputLog", "StreamText", "text_of"]

_MIN_CHUNK = 4_000  # characters: a smaller chunk stays open (each chunk is two widgets)
_MAX_CHUNK = 16_000  # characters: a larger one is frozen however little it has cost yet
_SPENT_RATIO = 2  # freeze once the open chunk was sent this many times its size
_GROUP = 16  # chunks per VBox: a new chunk resends one short list of children

#: Where a chunk starts: the index of an output in the log, and an offset into its text
#: (a stream may be split between chunks, at a line end).
Position = tuple[int, int]


class StreamText:
    """A stream's text, kept as the pieces it came in.

    Appending copies nothing, and a span copies only what it holds: joining the text
    whole at each piece, as ``text + piece`` does, costs time quadratic in the text.

    Parameters
    ----------
    text
        The first piece.
    """

    def __init__(self, text: str = "") -> None:
        self._pieces: list[str] = []
        self._ends: list[int] = []  # where each piece ends in the text, for bisect
        self.append(text)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __str__(self) -> str:
        if len(self._pieces) > 1:  # joined once, until more comes
            self._pieces = ["".join(self._pieces)]
            self._ends = [len(self._pieces[0])]
        return self._pieces[0] if self._pieces else ""

    def append(self, text: str) -> None:
        """Add ``text`` at the end."""
        if text:
            self._ends.append(len(self) + len(text))
            self._pieces.append(text)

    def span(self, start: int = 0, stop: int | None = None) -> str:
        """``text[start:stop]``, copying only that span (both within the text)."""
        stop = len(self) if stop is None else min(stop, len(self))
        if start >= stop:
            return ""
        if start == 0 and stop == len(self):
            return str(self)
        first = bisect_right(self._ends, start)
        last = bisect_left(self._ends, stop)
        begin = self._begin(first)
        if first == last:
            return self._pieces[first][start - begin : stop - begin]
        return "".join(
            [
                self._pieces[first][start - begin :],
                *self._pieces[first + 1 : last],
                self._pieces[last][: stop - self._begin(last)],
            ]
        )

    def line_end(self, start: int) -> int:
        """Where the text's last line break at or after ``start`` ends; ``start`` if none."""
        for k in range(len(self._pieces) - 1, -1, -1):
            begin = self._begin(k)
            if self._ends[k] <= start:
                break
            found = self._pieces[k].rfind("\n", max(0, start - begin))
            if found >= 0:
                return begin + found + 1
        return start

    def _begin(self, k: int) -> int:
        """Where piece ``k`` begins in the text."""
        return self._ends[k] - len(self._pieces[k])


class OutputLog:
    """A task's output as nbformat outputs, in order, as a kernel would show it.

    Adjacent stream text of one stream is merged; a display update (``display_id`` with
    ``update``, e.g. ``DisplayHandle.update``) replaces the outputs shown under that id
    instead of adding one; ``clear_output()`` empties the log.

    A stream's text is kept as a :class:`StreamText` (:meth:`stream`): reading
    :attr:`outputs` or :meth:`text` joins it, :meth:`part` copies only a span. Reading
    changes how the pieces are kept: one thread at a time (a view's lock).
    """

    def __init__(self) -> None:
        # Displays as nbformat outputs; a stream as one whose "text" is a StreamText.
        self._outputs: list[dict[str, Any]] = []
        self.ids: list[str | None] = []  # the display id of each output, if any

    def __len__(self) -> int:
        return len(self._outputs)

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The outputs, in order, as nbformat outputs (each stream's text joined)."""
        return [self.part(i) for i in range(len(self._outputs))]

    def add(self, event: Event) -> list[int]:
        """Add one STDOUT, STDERR or DISPLAY event; return the indices it added or changed.

        A clear returns nothing (the log is empty), as does an update of an unknown
        display (nothing is shown, as in a kernel).
        """
        if event.type is not EventType.DISPLAY:
            name = "stdout" if event.type is EventType.STDOUT else "stderr"
            text = str(event.data.get("text", ""))
            last = self._outputs[-1] if self._outputs else None
            if last is not None and last["output_type"] == "stream" and last["name"] == name:
                last["text"].append(text)
            else:
                stream = {"output_type": "stream", "name": name, "text": StreamText(text)}
                self._outputs.append(stream)
                self.ids.append(None)
            return [len(self._outputs) - 1]
        data = dict(event.data)
        if data.get("clear"):
            self._outputs.clear()
            self.ids.clear()
            return []
        output = {
            "output_type": "display_data",
            "data": data.get("data", {}),
            "metadata": data.get("metadata", {}),
        }
        display_id = dict(data.get("transient") or {}).get("display_id")
        if data.get("update"):
            if display_id is None:
                return []
            replaced = [i for i, known in enumerate(self.ids) if known == display_id]
            for i in replaced:
                self._outputs[i] = output
            return replaced
        self._outputs.append(output)
        self.ids.append(None if display_id is None else str(display_id))
        return [len(self._outputs) - 1]

    def stream(self, index: int) -> StreamText | None:
        """The text of output ``index`` if it is a stream, else None (a display)."""
        output = self._outputs[index]
        return output["text"] if output["output_type"] == "stream" else None

    def part(self, index: int, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        """Output ``index`` as an nbformat output; a stream's only from ``start`` to ``stop``."""
        output = self._outputs[index]
        if output["output_type"] != "stream":
            return output
        return {**output, "text": output["text"].span(start, stop)}

    def text(self) -> str:
        """The outputs as plain text (displays by their ``text/plain``)."""
        return "".join(map(text_of, self._outputs))


class Chunks:
    """An :class:`OutputLog` cut into chunks, each sent again only when it changed.

    Feed it with :meth:`add`, send what changed with :meth:`sync` (one writer at a time:
    the view's lock). A subclass shows a chunk (:meth:`_show`, :meth:`_made`,
    :meth:`_placed`).

    Parameters
    ----------
    log
        The model: every event goes into it, and the chunks show it.
    """

    def __init__(self, log: OutputLog) -> None:
        self.log = log
        self._starts: list[Position] = [(0, 0)]  # the last chunk is the open one
        self._dirty: set[int] = set()  # chunks to send at the next sync
        self._spent = 0  # characters sent for the open chunk so far

    def add(self, event: Event) -> None:
        """Put one output event into the log and note which chunks it changed."""
        before = len(self.log)
        changed = self.log.add(event)
        if len(self.log) < before:  # clear_output(): one empty chunk again
            self._starts = [(0, 0)]
            self._dirty = {0}
            self._spent = 0
        for index in changed:
            self._dirty.add(self._chunk_of(index))
            if index >= before and self.log.ids[index] is not None:
                self._isolate(index)

    def sync(self) -> None:
        """Send the chunks that changed since the last sync, freezing the open one if due."""
        if not self._dirty:
            return
        if len(self._starts) - 1 in self._dirty:
            self._maybe_freeze()
        opened = len(self._starts) - 1
        count = self._made()
        for j in sorted(self._dirty):
            shown = self._slice(j)
            if j >= self._made() and not shown and j == opened:
                continue  # an empty open chunk waits for output before it is made
            self._show(j, shown)
            if j == opened:
                self._spent += _size(shown)
        self._dirty.clear()
        self._placed(count)

    # What a subclass shows ---------------------------------------------------------------------
    def _made(self) -> int:
        """How many chunks were shown so far."""
        raise NotImplementedError

    def _show(self, j: int, outputs: list[dict[str, Any]]) -> None:
        """Show ``outputs`` as chunk ``j`` (making it, and any before it not made yet)."""
        raise NotImplementedError

    def _placed(self, count: int) -> None:
        """After a sync: ``count`` chunks were shown before it; those past the last go."""

    # Chunks ----------------------------------------------------------------------------------
    def _chunk_of(self, index: int) -> int:
        """The chunk showing the end of output ``index`` (where a stream grows)."""
        stream = self.log.stream(index)
        return bisect_right(self._starts, (index, 0 if stream is None else len(stream))) - 1

    def _isolate(self, index: int) -> None:
        """Give a new display with a display id a chunk of its own (updates resend it only)."""
        if self._starts[-1] < (index, 0):
            self._starts.append((index, 0))
        self._starts.append((index + 1, 0))
        self._dirty.add(len(self._starts) - 2)
        self._spent = 0

    def _maybe_freeze(self) -> None:
        """Start a new open chunk once the open one is large, or was resent enough."""
        size = _size(self._slice(len(self._starts) - 1))
        if size < _MIN_CHUNK or (size < _MAX_CHUNK and self._spent < _SPENT_RATIO * size):
            return
        cut = self._cut()
        if cut is not None:
            self._starts.append(cut)
            self._dirty.add(len(self._starts) - 1)
            self._spent = 0

    def _cut(self) -> Position | None:
        r"""Where the open chunk can end: after its last full line, or its last output.

        A line is split only when it is long and has no carriage return (a ``\r`` would
        no longer overwrite the part left in the frozen chunk).
        """
        first, offset = self._starts[-1]
        last = len(self.log) - 1
        text = self.log.stream(last)
        if text is None:
            return (last + 1, 0)
        begin = offset if last == first else 0
        end = text.line_end(begin)
        if end > begin:
            return (last, end)
        if last > first:
            return (last, 0)
        if len(text) - begin >= _MAX_CHUNK and "\r" not in text.span(begin):
            return (last, len(text))
        return None

    def _slice(self, j: int) -> list[dict[str, Any]]:
        """The outputs chunk ``j`` shows: the log between its start and the next's."""
        count = len(self.log)
        first, offset = self._starts[j]
        stop, stop_offset = self._starts[j + 1] if j + 1 < len(self._starts) else (count, 0)
        shown = []
        for k in range(first, min(stop + (1 if stop_offset else 0), count)):
            output = self.log.part(
                k, offset if k == first else 0, stop_offset if k == stop else None
            )
            if output["output_type"] != "stream" or output["text"]:
                shown.append(output)
        return shown


class ChunkedOutput(Chunks):
    """An :class:`OutputLog` shown as a column of Output widgets, sent chunk by chunk.

    Display :attr:`box`.

    Parameters
    ----------
    log
        The model: every event goes into it, and the chunks show it.
    """

    def __init__(self, log: OutputLog) -> None:
        super().__init__(log)
        self.box = w.VBox(layout=w.Layout(margin="0"))
        self.chunks: list[w.Output] = []  # one per chunk shown so far, in order
        self._groups: list[w.VBox] = []

    def shown(self) -> list[dict[str, Any]]:
        """The outputs the chunks show, in order (split streams as several outputs)."""
        return [output for chunk in self.chunks for output in chunk.outputs]

    def _made(self) -> int:
        return len(self.chunks)

    def _show(self, j: int, outputs: list[dict[str, Any]]) -> None:
        while len(self.chunks) <= j:
            self.chunks.append(w.Output(layout=w.Layout(margin="0")))
        self.chunks[j].outputs = tuple(outputs)

    def _placed(self, count: int) -> None:
        if len(self.chunks) != count or len(self.chunks) > len(self._starts):
            self._lay_out(min(count, len(self._starts)))

    def _lay_out(self, first: int) -> None:
        """Place chunks from ``first`` on (and drop those a clear emptied), in groups."""
        gone: list[w.Widget] = self.chunks[len(self._starts) :]
        del self.chunks[len(self._starts) :]
        needed = -(-len(self.chunks) // _GROUP)
        while len(self._groups) < needed:
            self._groups.append(w.VBox(layout=w.Layout(margin="0")))
        gone += self._groups[needed:]
        del self._groups[needed:]
        for i in range(first // _GROUP, needed):
            self._groups[i].children = tuple(self.chunks[i * _GROUP : (i + 1) * _GROUP])
        self.box.children = tuple(self._groups)
        for widget in gone:
            widget.close()


def text_of(output: dict[str, Any]) -> str:
    """An output as plain text: a stream's text, a display's ``text/plain`` and a line end."""
    if output["output_type"] == "stream":
        return str(output["text"])
    return str(output["data"].get("text/plain", "")) + "\n"


def _size(outputs: list[dict[str, Any]]) -> int:
    """About how many characters sending these outputs takes."""
    total = 0
    for output in outputs:
        if output["output_type"] == "stream":
            total += len(output["text"])
        else:
            total += sum(len(str(value)) for value in output["data"].values())
    return total
