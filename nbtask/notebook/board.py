"""``%tasks``: a live board of a notebook's tasks, and finding them again after a restart.

The board has one row per task (name or cell, state, progress, worker, duration) and an
*Open* button per row that shows that task's own widget under the board. It is repainted
by the session's ticker (about twice a second), reading the tasks' views and handles; rows
are added as new cells are sent.

After a kernel restart the notebook has a new client (a new event channel). Each session
notes its client under a **notebook group** on the broker (see :func:`notebook_group`), so
``%tasks --all`` finds the tasks that this notebook's earlier kernels sent, for as long as
the result store keeps them (``result_ttl``), and re-attaches to them, replaying their
output from their client's event channel.
"""

from __future__ import annotations

import getpass
import hashlib
import html
import os
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from nbtask._text import count_text
from nbtask.core.handle import TaskHandle
from nbtask.notebook.widgets import TaskView, duration_text

__all__ = ["COLUMNS", "Row", "TaskBoard", "cut_text", "fit", "format_row", "notebook_group"]


def notebook_group(environ: dict[str, str] | None = None, cwd: str | None = None) -> str:
    """The stable name under which a notebook's clients are noted on the broker.

    It is a digest of the user name and the notebook: ``JPY_SESSION_NAME`` (the notebook's
    path, which Jupyter gives every kernel it starts for a notebook) when set, else the
    working directory (a kernel's is the notebook's folder). So a restarted kernel of the
    same notebook, by the same user, finds the tasks its earlier kernels sent.
    """
    env = os.environ if environ is None else environ
    where = env.get("JPY_SESSION_NAME") or cwd or os.getcwd()
    try:
        user = getpass.getuser()
    except Exception:  # no user name known (some containers)
        user = ""
    return hashlib.sha1(f"{user}\0{where}".encode()).hexdigest()[:20]


class Row:
    """One task on the board: where its state is read from."""

    def __init__(self, handle: TaskHandle, label: str, view: TaskView | None) -> None:
        self.handle = handle
        self.label = label
        self.view = view

    def cells(self) -> tuple[str, str, str, str, str]:
        """``(label, state, progress, worker, duration)`` as text.

        A task that waits for a worker of its queue says why in the worker column.
        """
        view, handle = self.view, self.handle
        state = str(view.state.value if view is not None else handle.state)
        if view is not None:
            progress = view.progress_text()
            worker = f"{view.worker} pid {view.pid}" if view.worker else ""
            waiting = view.waiting
            duration = view.elapsed_text()
        else:
            report = handle.progress
            progress = "" if report is None else count_text(report.done, report.total)
            info = handle.info
            worker = f"{info['worker']} pid {info.get('pid', '')}" if "worker" in info else ""
            waiting = info.get("waiting", "")
            duration = duration_text(handle.started_at, handle.finished_at)
        return self.label, state, progress, worker or (waiting and f"waiting: {waiting}"), duration


def format_row(row: Row) -> str:
    """One text line of the board; a label too long for its column ends in ``…``."""
    label, state, progress, worker, duration = row.cells()
    return (
        f"{row.handle.id[:8]}  {fit(label, 30):30}  {state:11} {progress:18} {worker:22} {duration}"
    ).rstrip()


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, its last one ``…`` when it was cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


#: The board's columns (task, state, progress, worker, time, Open). The text columns may
#: shrink below their text (``minmax(0, …)``: a grid column is as wide as its longest
#: text otherwise, and a long label pushes the board past the cell), each cut with an
#: ellipsis and its full text in its tooltip; state, time and the button keep theirs.
COLUMNS = "minmax(0, 3fr) max-content minmax(0, 2fr) minmax(0, 2fr) max-content max-content"


def cut_text(text: str) -> str:
    """``text`` as HTML cut with an ellipsis where its column is narrower, whole on hover.

    A Label's tooltip is not shown by every frontend; an element's ``title`` is.
    """
    shown = html.escape(text)
    return (
        f'<div title="{shown}" style="overflow:hidden;text-overflow:ellipsis;'
        f'white-space:nowrap">{shown}</div>'
    )


class TaskBoard:
    """The ``%tasks`` widget: a live table of tasks whose rows re-open each task's widget.

    Parameters
    ----------
    rows
        Returns the rows to show now (called at each refresh; new tasks appear).
    opener
        Returns the widget view of a task id (re-attaching if needed); shown under the
        board when its row's *Open* button is clicked.
    """

    def __init__(self, rows: Callable[[], list[Row]], opener: Callable[[str], TaskView]) -> None:
        self._w = w
        self._rows = rows
        self._opener = opener
        self._lock = threading.Lock()
        self._shown: dict[str, tuple[Any, ...]] = {}  # task id -> its row's widgets
        header = [w.HTML(f"<b>{t}</b>") for t in ("task", "state", "progress", "worker", "time")]
        self.table = w.GridBox(
            header,
            layout=w.Layout(
                grid_template_columns=COLUMNS,
                grid_gap="2px 8px",
                width="100%",
                align_items="center",
            ),
        )
        self._header = [*header, w.HTML("")]
        self.table.children = tuple(self._header)
        self.detail = w.Box()  # the re-opened task's widget
        self.box = w.VBox([self.table, self.detail])
        self.opened: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Add rows for new tasks and repaint every row (only changed values are sent)."""
        with self._lock:
            rows = self._rows()
            added = False
            for row in rows:
                if row.handle.id not in self._shown:
                    self._shown[row.handle.id] = self._make_row(row.handle.id)
                    added = True
            if added:
                cells = [c for row in rows for c in self._shown[row.handle.id]]
                self.table.children = tuple([*self._header, *cells])
            for row in rows:
                label, state, progress, worker, duration = row.cells()
                name, badge, bar, where, took, _ = self._shown[row.handle.id]
                for cell, text in ((name, label), (bar, progress), (where, worker)):
                    cell.value = cut_text(text)
                badge.value = f"<span>{html.escape(state)}</span>"
                took.value = duration

    def _make_row(self, task_id: str) -> tuple[Any, ...]:
        w = self._w
        button = w.Button(description="Open", tooltip=f"show task {task_id}")
        button.on_click(lambda _b: self.open(task_id))
        # Blocks, not flex boxes (the widgets' own display): only a block's text can end
        # in an ellipsis.
        texts = [
            w.HTML(layout=w.Layout(min_width="0", overflow="hidden", display="block"))
            for _ in range(3)
        ]
        name, progress, worker = texts
        return (name, w.HTML(), progress, worker, w.Label(), button)

    def open(self, task_id: str) -> TaskView:
        """Show the task's own widget under the board (what a row's button does)."""
        view = self._opener(task_id)
        box = getattr(view, "box", None)
        self.detail.children = () if box is None else (box,)
        self.opened = task_id
        return view

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.box._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # frontends without widgets show the text board
            bundle["text/plain"] = "\n".join(format_row(r) for r in self._rows()) or "no tasks"
        return bundle
