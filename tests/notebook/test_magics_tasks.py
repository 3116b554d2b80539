"""The magics in a real IPython shell, against the real Redis and the embedded cluster:
following a cell's task (cancel, interrupt, timeout, re-attach, ``%tasks``, status) and
where it runs (routes, the embedded cluster).

What a cell runs and what comes back is ``test_magics.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from typing import Any

import pytest
from helpers import cell_run, processes_mentioning, wait_until
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State
from nbtask.client.embedded import EmbeddedCluster
from nbtask.errors import BlobError, CellError
from nbtask.notebook.magics import session_of
from nbtask.notebook.session import Session
from nbtask.notebook.wait_inserter import WaitInserter


def test_cancel_running_cell(ip: InteractiveShell, nb: Session) -> None:
    from nbtask.notebook.follow import cancel_task

    ip.run_cell_magic("task", "--out h", "import time\nprint('started')\ntime.sleep(30)\ndone = 1")
    handle = ip.user_ns["h"]
    wait_until(lambda: "started" in handle.stdout, 15, "the cell to start")
    cancel_task(handle)
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED
    view = nb.views[handle.id]
    wait_until(lambda: view.state is State.REVOKED, 5, "the view to show REVOKED")


def test_interrupt_while_waiting_cancels(ip: InteractiveShell, nb: Session) -> None:
    import signal

    ip.run_cell_magic("task", "--out h", "import time\nprint('started')\ntime.sleep(30)\nlate = 1")
    handle = ip.user_ns["h"]
    wait_until(lambda: "started" in handle.stdout, 15, "the cell to start")
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        nb.pending.wait(["late"])
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED


def test_a_waiting_cell_reads_its_output_on_its_own_thread(
    ip: InteractiveShell, nb: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip.run_cell_magic("task", "--wait", "x = 1")  # the listener is up
    listener = nb.app._listener
    assert listener is not None
    readers: list[str] = []
    dispatch = listener._dispatch

    def noted(raw: bytes) -> None:
        readers.append(threading.current_thread().name)
        dispatch(raw)

    monkeypatch.setattr(listener, "_dispatch", noted)
    cell = "import time\nprint('a')\ntime.sleep(0.3)\nprint('b')\ntime.sleep(0.3)\ny = 2"
    ip.run_cell_magic("task", "--wait", cell)
    assert ip.user_ns["y"] == 2
    # The cell read events itself, with no hop through the listener thread. (The listener
    # may still have been reading when the cell was sent: it reads what comes first.)
    assert threading.current_thread().name in readers, readers


def test_reattach_replays_a_finished_tasks_output(
    ip: InteractiveShell, nb: Session, settings: Settings
) -> None:
    ip.run_cell_magic("task", "--wait --out h", "print('kept output')\nanswer = 42\nanswer")
    task_id = ip.user_ns["h"].id
    from nbtask import App

    other = Session(ip, App("other", settings=settings))  # another kernel, in effect
    try:
        view = other.attach(task_id)
        wait_until(lambda: view.state is State.SUCCESS, 10, "the re-attached state")
        assert "kept output" in "".join(
            str(e.data.get("text", "")) for e in other.app.handle(task_id).outputs
        ) or "kept output" in getattr(view, "text", "")
    finally:
        other.app.close()


def test_embedded_cluster(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    ip.run_line_magic("load_ext", "nbtask")
    assert "embedded cluster" in capsys.readouterr().out
    cell_run(ip, "n = 5")
    result = ip.run_cell_magic("task", "--wait", "import os\nsquare = n * n\nos.getpid()")
    assert ip.user_ns["square"] == 25
    assert result != os.getpid()
    ip.run_line_magic("reload_ext", "nbtask")  # a new session; the old cluster is stopped
    assert ip.run_cell_magic("task", "--wait", "square + 1") == 26


def test_resizing_the_embedded_cluster_refuses_to_lose_kept_values(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    ip.run_line_magic("load_ext", "nbtask")
    ip.run_cell_magic("task", "--wait --keep big --keep other", "big = list(range(10))\nother = 2")
    with pytest.raises(CellError) as refused:
        ip.run_line_magic("nbtask", "workers 3")
    assert str(refused.value) == (
        "%nbtask workers 3 would lose big, other: kept on the workers, they go with the "
        "embedded cluster, which a resize starts anew. Fetch each into the notebook first "
        "(big = big.fetch()), or del what is not needed, then resize. Nothing was changed"
    )
    session = session_of(ip)
    assert session is not None and session.app.settings.embedded_workers == 2
    held = ip.user_ns["other"]  # a reference no name of the notebook holds
    cell_run(ip, "big = big.fetch()\ndel other")
    capsys.readouterr()
    ip.run_line_magic("nbtask", "workers 3")
    assert "3 worker processes" in capsys.readouterr().out
    assert ip.run_cell_magic("task", "--wait", "sum(big)") == 45
    # What no name held was released: its error says by what.
    with pytest.raises(BlobError, match=r"released when the embedded cluster was started anew"):
        held.fetch()


def test_stop_while_the_session_starts_stops_the_embedded_cluster(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    started: list[EmbeddedCluster] = []

    class StopWhenSaid(io.StringIO):
        """Ctrl-C as the session says where cells run: its last step, the cluster ready."""

        def write(self, text: str) -> int:
            if "embedded cluster" in text:
                cluster = nbtask.app().cluster
                assert cluster is not None
                started.append(cluster)
                raise KeyboardInterrupt
            return super().write(text)

    with contextlib.redirect_stdout(StopWhenSaid()), pytest.raises(KeyboardInterrupt) as stop:
        ip.run_line_magic("load_ext", "nbtask")
    assert stop.value._render_traceback_() == ["KeyboardInterrupt"]  # type: ignore[attr-defined]
    directory = str(started[0].directory)
    assert started[0].process.poll() is not None
    assert not processes_mentioning(directory) and not os.path.exists(directory)
    assert session_of(ip) is None
    assert not [t for t in ip.ast_transformers if isinstance(t, WaitInserter)]

    ip.run_line_magic("load_ext", "nbtask")
    assert "embedded cluster" in capsys.readouterr().out
    assert ip.run_cell_magic("task", "--wait", "6 * 7") == 42


def test_timeout_cancels_a_background_and_a_waiting_cell(ip: InteractiveShell, nb: Session) -> None:
    ip.run_cell_magic("task", "--timeout 1 --out h", "import time\ntime.sleep(30)\nlate = 1")
    handle = ip.user_ns["h"]
    wait_until(handle.done, 15, "the timeout to cancel the task")
    assert handle.state is State.REVOKED
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 1\.0 s"):
        ip.run_cell_magic("task", "--wait --timeout 1", "import time\ntime.sleep(30)")
    assert time.monotonic() - started < 5


def test_status_lists_busy_tasks(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell_magic("task", "--out h", "import time\nprint('go')\ntime.sleep(30)\nzz = 1")
    handle = ip.user_ns["h"]
    wait_until(lambda: "go" in handle.stdout, 15, "the cell to start")
    wait_until(lambda: "busy 1 (import time)" in nb.status(), 5, "the next heartbeat")
    handle.cancel()
    wait_until(handle.done, 15, "the cancel")


def test_tasks_all_after_a_restart_reattaches_and_replays(
    ip: InteractiveShell, nb: Session, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell_magic("task", "--wait --out h", "print('kept output')\nanswer = 42")
    first = ip.user_ns["h"].id
    ip.run_cell_magic("task", "--wait", "print('second')")
    from nbtask import App

    # A restarted kernel: a new session with a new client, for the same notebook.
    later = Session(ip, App("restarted", settings=settings))
    later.app.connect()
    later.app.store.recent_tasks(later.group, later.app.channel, 0)
    try:
        assert later.board() == "no tasks yet"
        capsys.readouterr()
        ids = later.attach_recent()
        assert ids[0] == first and len(ids) == 2
        view = later.views[first]
        wait_until(lambda: view.state is State.SUCCESS, 10, "the re-attached state")
        assert "kept output" in view.text  # type: ignore[attr-defined]
        board = later.board()
        assert first[:8] in board and "SUCCESS" in board
        assert "kept output" not in capsys.readouterr().out  # re-attached quietly
        from nbtask.notebook.magics import TaskMagics

        TaskMagics(ip, later).tasks(f"--attach {first}")
        assert "kept output" in capsys.readouterr().out
    finally:
        later.app.close()


def test_tasks_attach_and_log_take_the_short_id_views_show(
    ip: InteractiveShell, nb: Session, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell_magic("task", "--wait --out h", "print('kept output')\nanswer = 42")
    task_id = ip.user_ns["h"].id
    nb.app.store.append_journal(task_id, ["INFO said about it"])
    short = task_id[:8]
    assert short in nb.board()
    from nbtask.notebook.magics import TaskMagics

    # A restarted kernel: a new session with a new client, for the same notebook.
    later = Session(ip, App("restarted", settings=settings))
    try:
        capsys.readouterr()
        magics = TaskMagics(ip, later)
        magics.tasks(f"--attach {short}")
        assert "kept output" in capsys.readouterr().out
        assert list(later.views) == [task_id]
        magics.nbtask(f"log {short}")
        assert capsys.readouterr().out == "INFO said about it\n"
        magics.nbtask("log 0123456789abcdef")
        assert "nor one whose id begins with it" in capsys.readouterr().out
    finally:
        later.app.close()


def test_tasks_attach_of_an_unknown_id_says_so_in_one_line(
    ip: InteractiveShell, loaded: Session
) -> None:
    """As ``%nbtask log`` does: no traceback through nbtask's frames."""
    with pytest.raises(UsageError, match=r"^%tasks --attach: no task 'zzzzzzzz' in the result"):
        ip.run_line_magic("tasks", "--attach zzzzzzzz")
    with pytest.raises(UsageError, match=r"^%tasks --attach: task_id='z!' is not a valid id"):
        ip.run_line_magic("tasks", "--attach z!")


def test_tasks_after_a_restart_show_each_cells_label_and_run_time(
    ip: InteractiveShell, nb: Session, settings: Settings, access: RawBroker
) -> None:
    ip.run_cell_magic("task", "--wait --out h", "import time\ntime.sleep(0.5)\nslept = 1")
    slept = ip.user_ns["h"].id
    ip.run_cell_magic("task", "named_cell --wait", "x = 3")
    ip.run_cell_magic("task", "--wait --out h", "y = 4")
    old = ip.user_ns["h"].id
    # As the previous nbtask wrote it: a record without the label.
    access.store.hdel(nb.app.store.record_key(old), "label")
    before = {row.handle.id: row.cells() for row in nb.rows()}
    # A restarted kernel: a new session with a new client, for the same notebook.
    later = Session(ip, App("restarted", settings=settings))
    later.app.connect()
    later.app.store.recent_tasks(later.group, later.app.channel, 0)
    try:
        later.attach_recent()
        after = {row.handle.id: row.cells() for row in later.rows()}
    finally:
        later.app.close()
    labels = [label for label, *_ in after.values()]
    assert labels == ["import time", "named_cell", f"cell {old[:8]}"], after
    # The run time the worker's events gave, as this kernel showed it; the cell slept.
    durations = {task_id: cells[4] for task_id, cells in after.items()}
    assert durations == {task_id: cells[4] for task_id, cells in before.items()}
    assert float(durations[slept].removesuffix(" s")) >= 0.5, after


def test_task_board_rows_open_the_tasks_widget(ip: InteractiveShell, nb: Session) -> None:
    from nbtask.notebook.board import TaskBoard
    from nbtask.notebook.follow import follow
    from nbtask.notebook.widgets import TaskWidget

    ip.run_cell_magic("task", "--wait --out h", "print('in the widget')")
    handle = ip.user_ns["h"]
    widgets: dict[str, TaskWidget] = {}

    def opener(task_id: str) -> TaskWidget:
        widget = TaskWidget(nb.app.handle(task_id), "opened")
        follow(widget.handle, widget.apply)
        widgets[task_id] = widget
        return widget

    board = TaskBoard(nb.rows, opener)
    label, badge, *_rest, button = board._shown[handle.id]
    assert ">print(" in label.value and "SUCCESS" in badge.value
    button.click()
    assert board.detail.children == (widgets[handle.id].box,)
    assert "in the widget" in str(widgets[handle.id].output.shown())
    ip.run_cell_magic("task", "--wait", "x = 1")
    board.refresh()  # a new task gets a row
    assert len(board._shown) == 2


def test_task_board_cuts_long_text_with_an_ellipsis_its_tooltip_whole(
    ip: InteractiveShell, nb: Session
) -> None:
    """A long name fits its column (cut, ``…``) in the board, and is read whole on hover."""
    from nbtask.notebook.board import TaskBoard, format_row

    name = "a_cell_name_long_enough_to_be_cut_in_any_column_of_the_board"
    ip.run_cell_magic("task", f"--wait {name}", "x = 1")
    board = TaskBoard(nb.rows, lambda task_id: pytest.fail(f"opened {task_id}"))
    (task_id,) = board._shown
    label, _badge, _progress, worker, _took, _button = board._shown[task_id]
    # Whole, and whole in its tooltip: the frontend cuts it to its column.
    assert f'title="{name}"' in str(label.value), label.value
    assert f">{name}<" in str(label.value) and "text-overflow:ellipsis" in str(label.value)
    where = nb.rows()[0].cells()[3]  # "host pid 123"
    assert " pid " in where and f'title="{where}"' in worker.value and f">{where}<" in worker.value
    # Its column may shrink below its text (a block, so that its text ends in "…").
    columns = board.table.layout.grid_template_columns
    assert columns.startswith("minmax(0, "), columns
    assert (label.layout.min_width, label.layout.display) == ("0", "block")
    # The text board cuts it at its column, saying so.
    (row,) = nb.rows()
    line = format_row(row)
    assert f"{name[:29]}…" in line and name not in line, line


@pytest.mark.brokers
def test_routed_cells_and_a_cell_that_waits_for_a_worker(
    ip: InteractiveShell, nb: Session, start_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from nbtask.notebook.follow import follow
    from nbtask.notebook.widgets import TaskWidget

    nb.app.routes = {"etl.*": "lonely", "nbtask.cell": "lonely"}
    reason = "no live worker consumes queue 'lonely'"
    # A cell is routed by its name, one no key matches (or with no name) as nbtask.cell;
    # --queue beats the routes.
    ip.run_cell_magic("task", "etl.load --out h", "loaded = 1")
    ip.run_cell_magic("task", "misc --out m", "misc = 2")
    ip.run_cell_magic("task", "--out anon", "anon = 3")
    ip.run_cell_magic("task", "etl.other --queue default --wait --out direct", "other = 4")
    handle = ip.user_ns["h"]
    queues = [ip.user_ns[n].queue for n in ("h", "m", "anon", "direct")]
    assert queues == ["lonely", "lonely", "lonely", "default"]
    assert nb.app.cells["etl.load"].delay().queue == "lonely"  # the named cell as a task
    # The view under the cell, %tasks and %nbtask status say why the cell waits.
    view = nb.views[handle.id]
    assert view.waiting == reason
    assert f"waiting: {reason}" in view.status_text()
    assert f"[etl.load] PENDING waiting: {reason}" in capsys.readouterr().out
    widget = TaskWidget(handle, "etl.load")
    follow(handle, widget.apply)
    assert widget.detail.value == f"waiting: {reason}"
    ip.run_line_magic("tasks", "")
    assert f"waiting: {reason}" in capsys.readouterr().out
    assert f"(waiting: {reason})" in nb.status()
    # A --wait cell says so on its transient line until it times out.
    with pytest.raises(TimeoutError):
        ip.run_cell_magic("task", "etl.waits --wait --timeout 1", "never = 1")
    assert f"[etl.waits] waiting: {reason}" in capsys.readouterr().err
    # A worker of the queue comes: the cell runs and the notice is gone everywhere.
    start_worker("-Q", "lonely", concurrency=1)
    assert cell_run(ip, "loaded + misc + anon") == 6
    wait_until(lambda: view.state is State.SUCCESS, 10, "the view to show the end")
    assert view.waiting == "" and "waiting" not in nb.board()
    assert widget.waiting == "" and widget.detail.value == ""
