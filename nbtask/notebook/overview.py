"""What a notebook's session shows of its tasks: re-opened ones, the board, status and log.

:class:`TaskOverview` is mixed into :class:`~nbtask.notebook.session.Session`: re-opening a
task by id (``%tasks ID``, and the notebook's newest after a restart), the rows of the
``%tasks`` board, ``%nbtask status`` (broker, workers, the cells still pending) and
``%nbtask log``.
"""

from __future__ import annotations

from typing import Any

from IPython.display import display

from nbtask._text import printable, redact_url
from nbtask.client.app import App
from nbtask.client.reattach import journal_of, resolve_task_id
from nbtask.core.holding import is_holder_queue
from nbtask.errors import TaskNotFound
from nbtask.notebook.board import Row, TaskBoard, format_row
from nbtask.notebook.cell_handle import CellHandle
from nbtask.notebook.cell_run import CellRun, sent_label
from nbtask.notebook.follow import follow
from nbtask.notebook.pending import Pending
from nbtask.notebook.widgets import TaskView, TaskWidget, make_view, widgets_enabled
from nbtask.wire.holdings import holdings_lines

__all__ = ["TaskOverview"]


class TaskOverview:
    """The tasks a session sent or re-opened, as the notebook is shown them."""

    app: App
    shell: Any
    pending: Pending
    views: dict[str, TaskView]
    attached: dict[str, str]
    boards: list[TaskBoard]
    group: str

    def describe(self) -> str:
        """``nbtask: <broker>, <n> worker processes``."""
        if self.app.cluster is not None:
            where = f"embedded cluster ({self.app.cluster.url})"
            count = self.app.settings.embedded_workers
        else:
            where = redact_url(self.app.settings.broker_url or "")
            count = sum(info.concurrency for info in self.app.workers().values())
        return f"nbtask: {where}, {count} worker process{'es' if count != 1 else ''}"

    def attach(self, task_id: str, *, show: bool = True) -> TaskView:
        """Re-open a task by id (any client's), replaying the output it left.

        ``app.handle`` replays a finished task's output from its client's event channel
        (while it is kept) and follows a running one live.
        """
        if task_id not in self.views:  # a prefix of an id (as views show it) names that task
            task_id = resolve_task_id(self.app.store, task_id, self.app.settings.result_ttl)
        view = self.views.get(task_id)
        if view is None:
            handle = self.app.handle(task_id)
            if isinstance(handle, CellHandle):  # a cell's: its view follows the task
                handle = handle.handle
            label = self.attached.get(task_id) or _label_of(handle, self.pending.runs)
            view = make_view(handle, label, self.shell, show=show)
            if show and isinstance(view, TaskWidget):
                display(view)
            follow(handle, view.apply)
            self.views[task_id] = view
            self.attached.setdefault(task_id, label)
        elif show and isinstance(view, TaskWidget):
            display(view)
        return view

    def attach_recent(self, limit: int = 20) -> list[str]:
        """Re-attach to this notebook's newest tasks; return their ids, oldest first.

        The tasks of every client noted under :attr:`group`: this kernel's and those of
        earlier kernels of the notebook (before a restart).
        """
        found = self.app.store.recent_tasks(self.group, self.app.channel, limit)
        ids = []
        for task_id, _channel, _sent in reversed(found):
            try:
                self.attach(task_id, show=False)
            except Exception:  # expired meanwhile, or not ours to read: skip it
                continue
            ids.append(task_id)
        return ids

    def rows(self) -> list[Row]:
        """The rows of the board: tasks sent or re-opened here, in that order."""
        rows = [Row(r.handle, r.label, self.views.get(r.handle.id)) for r in self.pending.runs]
        known = {r.handle.id for r in rows}
        for task_id, label in self.attached.items():
            view = self.views.get(task_id)
            if task_id not in known and view is not None:
                rows.append(Row(view.handle, label, view))
        return rows

    def board(self) -> str:
        """One text line per task of this notebook (newest last)."""
        return "\n".join(format_row(row) for row in self.rows()) or "no tasks yet"

    def show_board(self) -> TaskBoard | None:
        """Display the live board (a widget in a kernel with widgets, else text)."""
        if widgets_enabled(self.shell):
            board = TaskBoard(self.rows, lambda task_id: self.attach(task_id, show=False))
            self.boards.append(board)
            display(board)
            return board
        print(self.board())
        return None

    def log(self, task_id: str | None = None, lines: int = 50) -> str:
        """A task's journal (handler output, retries...), or the embedded cluster's log."""
        if task_id:
            try:
                kept = journal_of(self.app.store, task_id, self.app.settings.result_ttl)
            except TaskNotFound as exc:
                return str(exc)
            return "\n".join(kept) if kept else f"nothing was logged about task {task_id}"
        cluster = self.app.cluster
        if cluster is None:
            return (
                "workers log to their own output (nbtask worker ...); %nbtask log ID shows "
                "what they said about one task"
            )
        text = (cluster.directory / "cluster.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def status(self) -> str:
        """Broker, workers (host/pid/queues/concurrency/busy) and running cells."""
        lines = [self.describe()]
        labels = {r.handle.id: r.label for r in self.pending.runs}
        # A worker's list is as of its last heartbeat: what this notebook already saw end
        # is not busy any more.
        ended = {r.handle.id for r in self.pending.runs if r.handle.done()}
        ended |= {t for t, view in self.views.items() if view.handle.done()}
        workers = self.app.workers()
        holdings = self.app.store.holdings([c for i in workers.values() for c in i.consumers])
        for worker_id, info in sorted(workers.items()):
            busy = [labels.get(t, t[:8]) for t in info.busy if t not in ended]
            data = f" datasets {','.join(info.datasets)}" if info.datasets else ""
            queues = ",".join(q for q in info.queues if not is_holder_queue(q))
            # The registry is unsigned: shown without control codes.
            lines.append(
                printable(
                    f"  worker {worker_id}: host {info.hostname} pid {info.pid} "
                    f"queues {queues} concurrency {info.concurrency}{data} "
                    f"busy {len(busy)}" + (f" ({', '.join(busy)})" if busy else "")
                )
            )
            lines.extend(holdings_lines(info, holdings, indent="    "))
        running = self.pending.running()
        lines.append(f"  {len(running)} cell(s) pending")
        for run in running:
            waiting = run.handle.waiting_reason
            why = f" (waiting: {waiting})" if waiting else ""
            lines.append(f"    {run.handle.id[:8]} {run.label} {run.handle.state!s}{why}")
        return "\n".join(lines)


def _label_of(handle: Any, runs: list[CellRun]) -> str:
    for run in runs:
        if run.handle.id == handle.id:
            return run.label
    return sent_label(handle)
