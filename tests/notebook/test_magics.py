"""The magics in a real IPython shell, against the real Redis and the embedded cluster:
what a cell runs and what comes back (names, output, progress, plots, errors).

Following, stopping and finding a cell's task again is ``test_magics_tasks.py``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from helpers import cell_run, rendered, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import State
from nbtask.notebook.session import Session
from nbtask.notebook.shipping import CellError
from nbtask.wire.events import EventType


def test_load_prints_broker_and_workers(nb: Session, capsys: pytest.CaptureFixture[str]) -> None:
    assert "worker process" in nb.describe()
    nb.shell.run_line_magic("nbtask", "status")
    out = capsys.readouterr().out
    assert "worker" in out and "queues default" in out


def test_help_lists_every_flag(ip: InteractiveShell, nb: Session) -> None:
    doc = ip.find_cell_magic("task").__doc__
    for flag in ("--queue", "--wait", "--timeout", "--retries", "--out", "name"):
        assert flag in doc


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_each_magic_prints_its_usage_for_help(
    ip: InteractiveShell, loaded: Session, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = ip.run_cell(f"%nbtask {flag}")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert out.startswith("usage: %nbtask") and "{connect,status,workers,log}" in out
    result = ip.run_cell(f"%tasks {flag}")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert out.startswith("usage: %tasks") and "--attach ID" in out
    # With a body: the usage alone, the cell neither run nor sent.
    result = ip.run_cell(f"%%task --wait {flag}\nran_anyway = 1\n")
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out
    assert out.startswith("usage: %%task") and "--requires DATASET" in out
    assert "ran_anyway" not in ip.user_ns
    assert not loaded.pending.runs


def test_wait_cell_three_names_in_place_change_and_result(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    cell_run(ip, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\nitems = [1]\nk = 10")
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
    assert cell_run(ip, "df.b.sum() + x + y + z") == 106


def test_background_cell_pending_names_and_independent_cells(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    cell_run(ip, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})")
    started = time.monotonic()
    ip.run_cell_magic(
        "task",
        "--out h",
        "import time\nfor i in range(6):\n    print('tick', i)\n    time.sleep(0.5)\n"
        "df['c'] = df.a + 1\nfinished = True\n",
    )
    cell_run(ip, "independent = 1 + 1")  # reads no pending name: runs at once
    assert time.monotonic() - started < 1.5
    assert ip.user_ns["h"].state is not State.SUCCESS
    assert "finished" not in ip.user_ns
    assert cell_run(ip, "list(df.c)") == [2, 3]  # waits for the task, then sees its change
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
    cell_run(ip, "pass")  # reads none of their names: a failed cell's error is not raised here
    assert ip.user_ns["a"] == 1 and "early" not in ip.user_ns
    ip.run_cell_magic("task", "--out later", "b = 2")  # after runs already seen finished
    wait_until(ip.user_ns["later"].done, 15, "the background cell to end")
    cell_run(ip, "pass")
    assert ip.user_ns["b"] == 2


def test_named_cell_rerun_with_other_inputs(ip: InteractiveShell, nb: Session) -> None:
    cell_run(ip, "base = 2\nfactor = 3")
    ip.run_cell_magic("task", "scale --wait", "scaled = base * factor\nlabel = f'{base}x{factor}'")
    assert ip.user_ns["scaled"] == 6
    cell = nb.app.cells["scale"]
    assert cell.delay(factor=10).get(timeout=20) == {"scaled": 20, "label": "2x10"}
    handles = cell.map([{"base": 1}, {"base": 5}])
    assert [h.get(timeout=20)["scaled"] for h in handles] == [3, 15]
    with pytest.raises(CellError, match=r"one dict per run, \{name: value\} of \['base', "):
        cell.map([{"base": 1}, [2]])  # nothing sent, not even the first


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


def test_tqdm_imported_in_a_cell_is_the_notebooks_tqdm_after_it(
    ip: InteractiveShell, nb: Session
) -> None:
    import tqdm
    import tqdm.auto

    ip.run_cell_magic(
        "task",
        "--wait",
        "from tqdm import tqdm\nfrom tqdm.auto import trange as tr\n"
        "for i in tqdm(range(3)):\n    pass\nbar = tqdm",
    )
    assert ip.user_ns["tqdm"] is ip.user_ns["bar"] is tqdm.tqdm
    assert ip.user_ns["tr"] is tqdm.trange


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
    # IPython's coloured traceback, as the kernel shows the cell's error locally.
    lines = rendered(info.value)
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert lines.count(lines[-1]) == 1, lines  # said once, as Python says it
    text = "\n".join(lines)
    # Lines count from the %%task line, as the notebook numbers them.
    assert "line 5, in f(v)" in text and "----> 7 f(a)" in text, text
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
    cell_run(ip, "def f(v):\n    return v * 2\nsettings = {'n': 1}")
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
    # logging.warning() set the root logger up (basicConfig): the last line goes through it.
    expected = ["3 rows dropped: bad dates", "WARNING:root:root warning", "ERROR:etl:failed: x"]
    assert said == expected, said


def test_unpicklable_variable_names_it_and_sends_nothing(ip: InteractiveShell, nb: Session) -> None:
    cell_run(ip, "import threading\nlock = threading.Lock()\nfine = 1")
    with pytest.raises(CellError, match=r"variable 'lock' \(_thread.lock\) cannot be pickled"):
        ip.run_cell_magic("task", "", "print(fine, lock)")
    with pytest.raises(CellError, match="'nowhere' is not defined"):
        ip.run_cell_magic("task", "", "print(nowhere)")
    assert nb.pending.runs == []


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


def test_a_tqdm_notebook_bar_becomes_progress_not_a_widget_no_kernel_has(
    ip: InteractiveShell, nb: Session
) -> None:
    """``tqdm.notebook`` draws an ipywidgets bar: made on a worker, its model would exist
    in no kernel ("model not found"). Its loop is the cell's progress, as ``tqdm``'s is;
    imported in the notebook first, the cell still gets the notebook's own back."""
    import tqdm.notebook

    ip.run_cell("from tqdm.notebook import tqdm as notebook_bar")
    ip.run_cell_magic(
        "task",
        "--wait --out h",
        "from tqdm.notebook import trange\ntotal = 0\n"
        "for i in trange(3):\n    total += i\n"
        "for i in notebook_bar(range(5), desc='adding'):\n    total += i\nagain = notebook_bar",
    )
    handle = ip.user_ns["h"]
    assert handle.progress is not None
    assert (handle.progress.done, handle.progress.total, handle.progress.message) == (
        5,
        5,
        "adding",
    )
    assert not any("widget" in str(e.data) for e in handle.outputs), handle.outputs
    assert ip.user_ns["total"] == 13
    assert ip.user_ns["again"] is ip.user_ns["notebook_bar"] is tqdm.notebook.tqdm
