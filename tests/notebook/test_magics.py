"""The magics in a real IPython shell, against the real Redis and the embedded cluster."""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import time
from typing import Any

import pytest
from helpers import processes_mentioning, wait_until
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State
from nbtask.client.embedded import EmbeddedCluster
from nbtask.notebook.magics import session_of
from nbtask.notebook.session import Session
from nbtask.notebook.shipping import CellError
from nbtask.notebook.wait_inserter import WaitInserter
from nbtask.wire.events import EventType


def run(ip: InteractiveShell, code: str) -> Any:
    result = ip.run_cell(code)
    if result.error_before_exec or result.error_in_exec:
        raise result.error_before_exec or result.error_in_exec
    return result.result


def test_load_prints_broker_and_workers(nb: Session, capsys: pytest.CaptureFixture[str]) -> None:
    assert "worker process" in nb.describe()
    nb.shell.run_line_magic("nbtask", "status")
    out = capsys.readouterr().out
    assert "worker" in out and "queues default" in out


def test_help_lists_every_flag(ip: InteractiveShell, nb: Session) -> None:
    doc = ip.find_cell_magic("task").__doc__
    for flag in ("--queue", "--wait", "--timeout", "--retries", "--out", "name"):
        assert flag in doc


def test_wait_cell_three_names_in_place_change_and_result(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\nitems = [1]\nk = 10")
    result = ip.run_cell_magic(
        "task",
        "--wait",
        "print('shipping', k)\n"
        "df['b'] = df.a * k\n"
        "items.append(2)\n"
        "x, y = k + 1, k + 2\n"
        "z = x + y\n"
        "z * 2\n",
    )
    assert "shipping 10" in capsys.readouterr().out
    assert repr(result) == "46"
    assert (ip.user_ns["x"], ip.user_ns["y"], ip.user_ns["z"]) == (11, 12, 23)
    assert list(ip.user_ns["df"]["b"]) == [10, 20, 30]
    assert ip.user_ns["items"] == [1, 2]
    assert run(ip, "df.b.sum() + x + y + z") == 106


def test_background_cell_pending_names_and_independent_cells(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})")
    started = time.monotonic()
    ip.run_cell_magic(
        "task",
        "--out h",
        "import time\nfor i in range(6):\n    print('tick', i)\n    time.sleep(0.5)\n"
        "df['c'] = df.a + 1\nfinished = True\n",
    )
    run(ip, "independent = 1 + 1")  # reads no pending name: runs at once
    assert time.monotonic() - started < 1.5
    assert ip.user_ns["h"].state is not State.SUCCESS
    assert "finished" not in ip.user_ns
    assert run(ip, "list(df.c)") == [2, 3]  # waits for the task, then sees its change
    assert time.monotonic() - started >= 2.5
    assert ip.user_ns["finished"] is True
    out = capsys.readouterr().out
    assert "waiting for task" in out and "tick 5" in out


def test_finished_background_cells_are_delivered_to_any_later_cell(
    ip: InteractiveShell, nb: Session
) -> None:
    for line, source in [("--out bad", "early = 1\nraise ValueError('no')"), ("--out ok", "a = 1")]:
        ip.run_cell_magic("task", line, source)
    for handle in (ip.user_ns["bad"], ip.user_ns["ok"]):
        wait_until(handle.done, 15, "the background cell to end")
    run(ip, "pass")  # reads none of their names: a failed cell's error is not raised here
    assert ip.user_ns["a"] == 1 and "early" not in ip.user_ns
    ip.run_cell_magic("task", "--out later", "b = 2")  # after runs already seen finished
    wait_until(ip.user_ns["later"].done, 15, "the background cell to end")
    run(ip, "pass")
    assert ip.user_ns["b"] == 2


def test_named_cell_rerun_with_other_inputs(ip: InteractiveShell, nb: Session) -> None:
    run(ip, "base = 2\nfactor = 3")
    ip.run_cell_magic("task", "scale --wait", "scaled = base * factor\nlabel = f'{base}x{factor}'")
    assert ip.user_ns["scaled"] == 6
    cell = nb.app.cells["scale"]
    assert cell.delay(factor=10).get(timeout=20) == {"scaled": 20, "label": "2x10"}
    handles = cell.map([{"base": 1}, {"base": 5}])
    assert [h.get(timeout=20)["scaled"] for h in handles] == [3, 15]


def test_tqdm_loop_becomes_progress(ip: InteractiveShell, nb: Session) -> None:
    ip.run_cell_magic(
        "task",
        "--wait --out h",
        "from tqdm import tqdm\nimport time\ntotal = 0\n"
        "for i in tqdm(range(20), desc='summing'):\n    total += i\n    time.sleep(0.01)\n",
    )
    handle = ip.user_ns["h"]
    assert handle.progress is not None
    assert (handle.progress.done, handle.progress.total) == (20, 20)
    assert handle.progress.message == "summing"
    assert "\r" not in handle.stderr and "it/s" not in handle.stderr
    assert ip.user_ns["total"] == 190


def test_nested_tqdm_loops_show_the_outer_bar_as_progress(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell_magic(
        "task",
        "--out h",
        "from tqdm import tqdm\nimport time\n"
        "for a in tqdm(range(3), desc='files'):\n"
        "    for b in tqdm(range(100), desc='rows', leave=False):\n"
        "        time.sleep(0.005)\n",
    )
    handle = ip.user_ns["h"]
    seen: list[Any] = []
    handle.on_event(
        lambda event: seen.append(event.progress) if event.type is EventType.PROGRESS else None
    )
    handle.get(timeout=60)
    assert seen, "no progress while the cell ran"
    assert {(p.total, p.message.split(" · ")[0]) for p in seen} == {(3, "files")}, seen[:5]
    assert any(re.fullmatch(r"files · rows \d+/100", p.message) for p in seen), seen[:5]
    assert (handle.progress.done, handle.progress.total) == (3, 3)


def test_plot_arrives_as_png_and_html_in_order(ip: InteractiveShell, nb: Session) -> None:
    ip.run_cell_magic(
        "task",
        "--wait --out h",
        "import matplotlib.pyplot as plt\nfrom IPython.display import HTML, display\n"
        "print('before')\ndisplay(HTML('<b>bold</b>'))\n"
        "plt.plot([1, 2, 3])\nplt.show()\nprint('after')\n",
    )
    kinds: list[Any] = []
    for event in ip.user_ns["h"].outputs:
        if event.type is EventType.DISPLAY:
            kinds.append(sorted(event.data["data"]))
        elif kinds and isinstance(kinds[-1], str):
            # A text event holds what was written since the one before: a print's text and
            # its newline may come apart.
            kinds[-1] += event.data["text"]
        else:
            kinds.append(event.data["text"])
    kinds = [k.strip() if isinstance(k, str) else k for k in kinds]
    assert kinds[0] == "before"
    assert "text/html" in kinds[1]
    assert "image/png" in kinds[2]
    assert kinds[-1] == "after"


def test_exception_is_the_users_type_with_cell_lines(ip: InteractiveShell, nb: Session) -> None:
    with pytest.raises(ZeroDivisionError) as info:
        ip.run_cell_magic("task", "--wait", "a = 1\n\ndef f(v):\n    return v / 0\n\nf(a)\n")
    lines = info.value._render_traceback_()  # type: ignore[attr-defined]
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert lines.count(lines[-1]) == 1, lines  # said once, as Python says it
    text = "\n".join(lines)
    # Lines count from the %%task line, as the notebook numbers them.
    assert "line 5, in f" in text and "line 7, in <module>" in text
    assert "return v / 0" in text
    assert "nbtask" not in text.replace("Cell In", "")


def test_a_frame_in_a_function_of_an_earlier_cell_is_named_as_the_notebook_names_it(
    ip: InteractiveShell, nb: Session
) -> None:
    defined = ip.run_cell(
        "def parse(row):\n    a, b = row.split(',')\n    return int(a) / int(b)",
        store_history=True,
    )
    assert defined.success
    number = defined.execution_count
    with pytest.raises(ZeroDivisionError) as info:
        ip.run_cell_magic("task", "--wait", "vals = [parse(r) for r in ['1,2', '3,0']]")
    lines = info.value._render_traceback_()  # type: ignore[attr-defined]
    at = lines.index(f'  File "Cell In[{number}]", line 3, in parse')
    assert lines[at + 1] == "    return int(a) / int(b)", lines  # as Python shows a frame
    assert not [line for line in lines if "ipython-input" in line], lines


def test_a_name_whose_new_value_cannot_come_back_is_not_left_with_its_old_one(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "def f(v):\n    return v * 2\nsettings = {'n': 1}")
    ip.run_cell_magic(
        "task",
        "--wait",
        "import threading\nf = threading.Lock()\nsettings['lock'] = threading.Lock()\nok = 1",
    )
    said = capsys.readouterr().err
    assert ip.user_ns["ok"] == 1
    # Rebound: locally f would be the lock, never the old function.
    assert "f" not in ip.user_ns
    assert "nbtask: f did not come back from the worker (" in said
    assert "it is not defined in the notebook after this cell" in said
    # Changed in place: the notebook keeps what it had.
    assert ip.user_ns["settings"] == {"n": 1}
    assert "settings did not come back" in said and "keeps its value from before" in said


def test_what_a_cell_logs_shows_in_the_cell_as_in_a_kernel(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell_magic(
        "task",
        "--wait",
        "import logging\nlog = logging.getLogger('etl')\nlog.warning('3 rows dropped: bad dates')\n"
        "log.info('not shown')\nlogging.warning('root warning')\nlog.error('failed: %s', 'x')",
    )
    said = capsys.readouterr().err.splitlines()
    assert said == ["3 rows dropped: bad dates", "WARNING:root:root warning", "failed: x"], said


def test_unpicklable_variable_names_it_and_sends_nothing(ip: InteractiveShell, nb: Session) -> None:
    run(ip, "import threading\nlock = threading.Lock()\nfine = 1")
    with pytest.raises(CellError, match=r"variable 'lock' \(_thread.lock\) cannot be pickled"):
        ip.run_cell_magic("task", "", "print(fine, lock)")
    with pytest.raises(CellError, match="'nowhere' is not defined"):
        ip.run_cell_magic("task", "", "print(nowhere)")
    assert nb.pending.runs == []


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


def test_shell_magics_and_system_commands_run_on_the_worker(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell_magic("task", "--wait --out h", "!echo from-shell\n%time v = 3\nw = v + 1")
    assert ip.user_ns["w"] == 4
    assert "from-shell" in ip.user_ns["h"].stdout


def test_a_cell_runs_as_the_kernels_input_transformers_made_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """An input transformer registered in the kernel (an extension's syntax) applies too."""

    def answer(lines: list[str]) -> list[str]:
        return [line.replace("ANSWER", "42") for line in lines]

    ip.input_transformers_post.append(answer)
    try:
        ip.run_cell_magic("task", "--wait", "x = ANSWER + 1")
        ip.run_cell_magic("task", "--wait", "x = ANSWER + 1")  # the same line, parsed once
    finally:
        ip.input_transformers_post.remove(answer)
    assert ip.user_ns["x"] == 43


def test_embedded_cluster(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    ip.run_line_magic("load_ext", "nbtask")
    assert "embedded cluster" in capsys.readouterr().out
    run(ip, "n = 5")
    result = ip.run_cell_magic("task", "--wait", "import os\nsquare = n * n\nos.getpid()")
    assert ip.user_ns["square"] == 25
    assert result != os.getpid()
    ip.run_line_magic("reload_ext", "nbtask")  # a new session; the old cluster is stopped
    assert ip.run_cell_magic("task", "--wait", "square + 1") == 26


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


def test_exception_type_from_a_module_is_reraised(ip: InteractiveShell, nb: Session) -> None:
    import json
    import statistics

    with pytest.raises(statistics.StatisticsError, match="no data") as caught:
        ip.run_cell_magic(
            "task", "--wait", "import statistics\nraise statistics.StatisticsError('no data')"
        )
    assert "line 3" in caught.value.remote_traceback  # type: ignore[attr-defined]
    # The exception itself travels, so one whose class needs more than a message (here
    # msg, doc, pos) comes back whole.
    with pytest.raises(json.JSONDecodeError) as decoded:
        ip.run_cell_magic("task", "--wait", "import json\njson.loads('{')")
    assert decoded.value.pos == 1


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
    assert label.value.startswith("print(") and "SUCCESS" in badge.value
    button.click()
    assert board.detail.children == (widgets[handle.id].box,)
    assert "in the widget" in str(widgets[handle.id].output.shown())
    ip.run_cell_magic("task", "--wait", "x = 1")
    board.refresh()  # a new task gets a row
    assert len(board._shown) == 2


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
    assert run(ip, "loaded + misc + anon") == 6
    wait_until(lambda: view.state is State.SUCCESS, 10, "the view to show the end")
    assert view.waiting == "" and "waiting" not in nb.board()
    assert widget.waiting == "" and widget.detail.value == ""
