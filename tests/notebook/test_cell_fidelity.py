"""A ``%%task`` cell behaves as it would locally: magics, process-wide state, partial
effects on failure, late-bound names, one-line refusals, and the notebook's own app."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, SECRET, broker_env, rendered, wait_until
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client.manager import KernelManager
from raw_broker import RawBroker

import nbtask
from nbtask import App, Settings, State
from nbtask.errors import CellError, CellNameError
from nbtask.notebook.session import Session


def test_matplotlib_inline_is_honoured_and_gui_backends_refused(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nx = 1")
    assert ip.user_ns["x"] == 1
    with pytest.raises(Exception, match="a worker has no screen"):
        task(ip, "%matplotlib qt\ny = 2")


def test_random_state_follows_the_notebook_both_ways(ip: InteractiveShell, nb: Session) -> None:
    run(ip, "import random\nrandom.seed(99)")
    task(ip, "a = random.random()")
    run(ip, "b = random.random()")  # the kernel's generator moved on as if it had drawn a
    random.seed(99)
    assert (ip.user_ns["a"], ip.user_ns["b"]) == (random.random(), random.random())


def test_top_level_await_runs_each_time_and_a_plain_cell_stays_plain(
    ip: InteractiveShell, nb: Session
) -> None:
    """As in a kernel: a cell with ``await`` at its top level runs as a coroutine, every run."""
    cell = "import asyncio\nlabel = await asyncio.sleep(0, result='awaited')\nruns = runs + 1"
    run(ip, "runs = 0")
    task(ip, cell)
    task(ip, cell)  # the same cell again: still run as a coroutine
    task(ip, "plain = runs * 10")
    assert (ip.user_ns["label"], ip.user_ns["runs"], ip.user_ns["plain"]) == ("awaited", 2, 20)


def test_del_in_a_cell_deletes_the_names_from_the_notebook(
    ip: InteractiveShell, nb: Session
) -> None:
    """As locally: ``del`` of a notebook name, or of one the cell bound first, unbinds it."""
    run(ip, "shipped_only = 1\nrebound = 2\nuntouched = 3")
    task(ip, "del shipped_only\nrebound = 5\ndel rebound\nfresh = 6\ndel fresh")
    task(ip, "if False:\n    del untouched")
    assert not {"shipped_only", "rebound", "fresh"} & set(ip.user_ns)
    assert ip.user_ns["untouched"] == 3
    with pytest.raises(CellError, match="name 'never_defined' is not defined"):
        task(ip, "del never_defined")


def test_a_cell_reads_the_notebooks_input_and_output_history(
    ip: InteractiveShell, nb: Session
) -> None:
    """``_``, ``__``, ``_3``, ``_i3``, ``In`` and ``Out`` are the notebook's, as locally."""
    ip.run_cell("40 + 2", store_history=True)
    first = ip.execution_count - 1
    ip.run_cell("'hello'", store_history=True)
    reads = f"got = (_, __, _{first}, Out[{first}], In[{first}], _i{first}, _i, len(In) == len(In))"
    run(ip, reads)
    local = ip.user_ns.pop("got")
    assert local[:6] == ("hello", 42, 42, 42, "40 + 2", "40 + 2")
    task(ip, reads)
    assert ip.user_ns["got"] == local
    # The worker shell's own output names never come back.
    numbered = {n for n in ip.user_ns if n[:1] == "_" and n[1:].isdigit()}
    task(ip, "last = 7\nlast * 6")
    assert {n for n in ip.user_ns if n[:1] == "_" and n[1:].isdigit()} == numbered


def test_globals_on_the_worker_hold_the_names_the_cell_reads_not_every_notebook_name(
    ip: InteractiveShell, nb: Session
) -> None:
    """Only what the cell reads is shipped: ``globals()`` there is not the whole notebook."""
    run(ip, "unread = 1\nread_here = 2")
    task(ip, "seen = ('unread' in globals(), 'read_here' in globals(), read_here)")
    assert ip.user_ns["seen"] == (False, True, 2)


def test_exit_in_a_cell_is_refused_on_the_worker_with_one_line(
    ip: InteractiveShell, nb: Session
) -> None:
    with pytest.raises(UsageError, match="exit\\(\\) would end the notebook's kernel"):
        task(ip, "before = 1\nexit()")
    assert ip.user_ns["before"] == 1  # what ran before it came back, as for any error


def test_input_in_a_cell_is_refused_at_the_cells_line_without_nbtask_frames(
    ip: InteractiveShell, nb: Session
) -> None:
    with pytest.raises(Exception, match="input\\(\\) cannot be answered in a %%task cell") as info:
        task(ip, "before = 1\nname = input('name? ')")
    assert type(info.value).__name__ == "StdinNotImplementedError"
    lines = rendered(info.value)
    assert "name = input('name? ')" in "\n".join(lines)
    assert not [line for line in lines if "nbtask" in line.split(":")[0]], lines
    assert ip.user_ns["before"] == 1


def test_sys_exit_in_a_cell_shows_as_in_a_kernel_without_the_workers_traceback(
    ip: InteractiveShell, nb: Session, capfd: pytest.CaptureFixture[str]
) -> None:
    """A kernel shows ``SystemExit: bad`` and IPython's warning once, no traceback of its own."""
    hint = "To exit: use 'exit', 'quit', or Ctrl-D."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ip.run_cell("%%task --wait\nimport sys\nbefore = 1\nsys.exit('bad')")
    assert isinstance(result.error_in_exec, SystemExit), result.error_in_exec
    assert str(result.error_in_exec) == "bad"
    assert ip.user_ns["before"] == 1
    said = capfd.readouterr().err
    warned = [w for w in caught if str(w.message) == hint]
    assert len(warned) + said.count(hint) == 1, (warned, said)  # IPython's, as in a kernel
    assert "Traceback" not in said and 'interactiveshell.py", line' not in said, said


def test_an_open_file_does_not_travel_as_another_kind_of_object(
    ip: InteractiveShell, nb: Session, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Pickled, an open file would arrive as a ``StringIO``: one line says it stays behind."""
    path = tmp_path / "lines.txt"
    path.write_text("first\nsecond\n")
    ip.user_ns["path"] = str(path)
    task(ip, "f = open(path)\nhead = f.readline()")
    assert ip.user_ns["head"] == "first\n"
    assert "f" not in ip.user_ns
    assert (
        "nbtask: f did not come back from the worker (TextIOWrapper is an open file, which "
        "cannot travel between processes): it is not defined in the notebook after this cell"
    ) in capfd.readouterr().err
    with open(path) as opened:
        ip.user_ns["g"] = opened
        with pytest.raises(CellError, match="variable 'g': TextIOWrapper is an open file"):
            task(ip, "text = g.read()")
    assert "text" not in ip.user_ns
    # Closed by its with block, it is named as what it is.
    task(ip, "with open(path) as h:\n    rest = h.read()")
    assert ip.user_ns["rest"] == "first\nsecond\n"
    assert "h" not in ip.user_ns
    assert "nbtask: h did not come back from the worker (TextIOWrapper is a closed file" in (
        capfd.readouterr().err
    )
    # One whose buffer was detached cannot even say whether it is closed: closed too.
    task(ip, "d = open(path)\nd.detach().close()\nafter = 1")
    assert ip.user_ns["after"] == 1
    assert "nbtask: d did not come back from the worker (TextIOWrapper is a closed file" in (
        capfd.readouterr().err
    )


def test_rc_params_environment_cwd_and_path_follow_the_notebook(
    ip: InteractiveShell, nb: Session, tmp_path: Path
) -> None:
    run(ip, "import matplotlib\nmatplotlib.rcParams['font.size'] = 21.0")
    run(ip, "import os\nos.environ['NBTASK_TEST_LABEL'] = 'from the notebook'")
    task(ip, "seen = (matplotlib.rcParams['font.size'], os.environ.get('NBTASK_TEST_LABEL'))")
    assert ip.user_ns["seen"] == (21.0, "from the notebook")
    folder = str(tmp_path)
    before = os.getcwd()
    try:
        task(
            ip,
            f"import os, sys\nos.chdir({folder!r})\nos.environ['NBTASK_TEST_BACK'] = 'set there'"
            f"\nsys.path.append({folder!r})\nmatplotlib.rcParams['font.size'] = 9.0",
        )
        assert os.getcwd() == folder
        assert os.environ.get("NBTASK_TEST_BACK") == "set there"
        assert folder in sys.path
        import matplotlib

        assert matplotlib.rcParams["font.size"] == 9.0
    finally:
        os.chdir(before)
        os.environ.pop("NBTASK_TEST_BACK", None)
        os.environ.pop("NBTASK_TEST_LABEL", None)
        while folder in sys.path:
            sys.path.remove(folder)
        matplotlib.rcParams["font.size"] = 10.0


def test_a_setting_a_cell_changes_in_place_comes_back_to_the_notebook(
    ip: InteractiveShell, nb: Session
) -> None:
    import matplotlib

    fonts = list(matplotlib.rcParams["font.sans-serif"])
    try:
        task(ip, "import matplotlib\nmatplotlib.rcParams['font.sans-serif'].insert(0, 'NbFont')")
        assert matplotlib.rcParams["font.sans-serif"] == ["NbFont", *fonts]
    finally:
        matplotlib.rcParams["font.sans-serif"] = fonts


def test_a_variable_the_notebook_sets_then_deletes_is_gone_on_the_worker(
    ip: InteractiveShell, loaded: Session, start_worker: Any
) -> None:
    start_worker(concurrency=1)  # the process that was shipped the variable runs both
    try:
        run(ip, "import os\nos.environ['NBTASK_TEST_DELETED'] = 'set'")
        task(ip, "first = os.environ.get('NBTASK_TEST_DELETED')")
        run(ip, "del os.environ['NBTASK_TEST_DELETED']")
        task(ip, "second = os.environ.get('NBTASK_TEST_DELETED')")
        assert (ip.user_ns["first"], ip.user_ns["second"]) == ("set", None)
    finally:
        os.environ.pop("NBTASK_TEST_DELETED", None)


def test_a_path_the_notebook_adds_then_removes_is_gone_on_the_worker(
    ip: InteractiveShell, loaded: Session, start_worker: Any, tmp_path: Path
) -> None:
    start_worker(concurrency=1)  # the process that was shipped the path runs both
    folder = str(tmp_path)
    try:
        run(ip, f"import sys\nsys.path.append({folder!r})")
        task(ip, f"first = {folder!r} in sys.path")
        run(ip, f"sys.path.remove({folder!r})")
        task(ip, f"second = {folder!r} in sys.path")
        assert (ip.user_ns["first"], ip.user_ns["second"]) == (True, False)
    finally:
        while folder in sys.path:
            sys.path.remove(folder)


def test_a_path_a_cell_removes_from_sys_path_is_removed_in_the_notebook(
    ip: InteractiveShell, loaded: Session, start_worker: Any, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    folder = str(tmp_path)
    try:
        run(ip, f"import sys\nsys.path.append({folder!r})")
        task(ip, f"sys.path.remove({folder!r})")
        assert folder not in sys.path  # as the cell would have left it locally
        task(ip, f"back = {folder!r} in sys.path")
        assert ip.user_ns["back"] is False
    finally:
        while folder in sys.path:
            sys.path.remove(folder)


def test_what_a_cell_set_on_the_worker_and_the_notebook_then_removed_is_gone_there(
    ip: InteractiveShell, loaded: Session, start_worker: Any, tmp_path: Path
) -> None:
    """Set by a cell (so never shipped from the notebook), then removed in the notebook."""
    start_worker(concurrency=1)
    folder = str(tmp_path)
    try:
        task(
            ip,
            f"import os, sys\nos.environ['NBTASK_TEST_PROBE'] = 'w'\nsys.path.append({folder!r})",
        )
        assert os.environ.get("NBTASK_TEST_PROBE") == "w" and folder in sys.path  # came back
        run(ip, f"del os.environ['NBTASK_TEST_PROBE']\nsys.path.remove({folder!r})")
        task(ip, f"gone = ('NBTASK_TEST_PROBE' not in os.environ, {folder!r} not in sys.path)")
        assert ip.user_ns["gone"] == (True, True)
    finally:
        os.environ.pop("NBTASK_TEST_PROBE", None)
        while folder in sys.path:
            sys.path.remove(folder)


def test_a_cell_of_another_notebook_on_the_same_worker_finds_none_of_this_ones_variables(
    ip: InteractiveShell, loaded: Session, start_worker: Any, settings: Settings, tmp_path: Path
) -> None:
    start_worker(concurrency=1)  # both notebooks' cells run in one worker process
    env = {k: v for k, v in os.environ.items() if k != "NBTASK_TEST_OTHER"}
    try:
        run(ip, "import os\nos.environ['NBTASK_TEST_OTHER'] = 'this notebook'")
        task(ip, "mine = os.environ.get('NBTASK_TEST_OTHER')")
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
        km.start_kernel(env={**env, **broker_env(settings)}, cwd=str(ROOT))
        client = km.client()
        client.start_channels()
        printed: list[str] = []

        def keep_stdout(message: dict[str, Any]) -> None:
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])

        try:
            client.wait_for_ready(timeout=30)
            client.execute_interactive("%load_ext nbtask", timeout=60)
            cell = "%%task --wait\nimport os\nprint(repr(os.environ.get('NBTASK_TEST_OTHER')))"
            client.execute_interactive(cell, timeout=60, output_hook=keep_stdout)
        finally:
            client.stop_channels()
            km.shutdown_kernel(now=False)
        assert (ip.user_ns["mine"], "".join(printed).strip()) == ("this notebook", "None")
    finally:
        os.environ.pop("NBTASK_TEST_OTHER", None)


def test_a_task_or_a_thread_between_two_cells_leaves_nothing_to_the_second(
    ip: InteractiveShell, loaded: Session, start_worker: Any, tmp_path: Path
) -> None:
    """The worker skips applying an unchanged state only when nothing could have changed it."""
    start_worker(concurrency=1)  # every cell and task in one process
    here = os.getcwd()
    run(ip, "import os, random\nrandom.seed(7)")
    task(ip, "first = os.getcwd()")
    task(ip, "again = os.getcwd()")  # the state as the cell before left it: not applied
    loaded.app.send_task("tests.sample_tasks.change_process_state", (str(tmp_path),)).get(30)
    task(ip, "after_task = (os.getcwd(), random.random())")
    random.seed(7)
    assert ip.user_ns["after_task"] == (here, random.random())
    thread = (
        "import threading, time\n"
        f"late = lambda: (time.sleep(0.3), os.chdir({str(tmp_path)!r}))\n"
        "threading.Thread(target=late).start()"
    )
    task(ip, thread)  # the thread moves the worker to another folder after the cell
    time.sleep(1.0)
    task(ip, "after_thread = os.getcwd()")
    assert (ip.user_ns["first"], ip.user_ns["again"], ip.user_ns["after_thread"]) == (here,) * 3


def test_a_dataset_loaded_for_a_cell_leaves_nothing_to_it(
    ip: InteractiveShell, loaded: Session, start_worker: Any
) -> None:
    """A loader runs before the cell, in its process: the cell still finds the kernel's state."""
    start_worker("--data", "noise=tests.sample_tasks:load_noise", concurrency=1)
    run(ip, "import random\nrandom.seed(7)")
    task(ip, "x = 1")  # changes nothing: the next cell would find the state as it left it
    task(ip, "import random\ndrawn = (len(noise), random.random())", "--wait --requires noise")
    random.seed(7)
    assert ip.user_ns["drawn"] == (3, random.random())


def test_a_worker_process_runs_no_thread_but_its_own_between_cells(
    ip: InteractiveShell, loaded: Session, start_worker: Any
) -> None:
    """Else no cell would find the state left by the cell before, and all would apply it."""
    start_worker(concurrency=1)
    task(ip, "from nbtask.notebook import task_threads\nothers = task_threads.alive()")
    assert ip.user_ns["others"] is False


@pytest.fixture
def shipped(ip: InteractiveShell) -> None:
    ip.user_ns["shipped"] = []


@pytest.mark.parametrize("line", ["--wait", "--out h"])
def test_names_bound_before_the_failing_line_come_back(
    ip: InteractiveShell, nb: Session, line: str, shipped: None
) -> None:
    source = "import json\nbound = 5\nshipped.append(1)\nraise KeyError('k')"
    if line == "--wait":
        with pytest.raises(KeyError):
            task(ip, source, line)
    else:
        task(ip, source, line)
        later = ip.run_cell("bound")  # a later cell reads it: waits, then raises the error
        assert isinstance(later.error_in_exec, KeyError)
    assert ip.user_ns["bound"] == 5
    assert ip.user_ns["shipped"] == [1]  # mutated in place before the failure, as locally
    assert "json" in ip.user_ns


def test_late_bound_names_star_imports_and_named_strings(ip: InteractiveShell, nb: Session) -> None:
    task(ip, "def f():\n    return later + 1")  # `later` is defined by a later cell
    run(ip, "later = 41")
    task(ip, "r = f()")
    assert ip.user_ns["r"] == 42
    task(ip, "from typing import *\npair = Tuple[int, int]")
    assert str(ip.user_ns["pair"]) == "typing.Tuple[int, int]"
    run(ip, "table = [1, 2, 3]\noffset = 10")
    task(ip, "total = sum(eval('table'))\nmore = eval('len(table) + offset')")  # via strings
    assert (ip.user_ns["total"], ip.user_ns["more"]) == (6, 13)


def test_a_cell_that_handles_an_undefined_name_runs_and_handles_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """As locally: the NameError is raised and caught on the worker, not refused here."""
    task(ip, "try:\n    undefined_thing\nexcept NameError as e:\n    caught = str(e)")
    assert ip.user_ns["caught"] == "name 'undefined_thing' is not defined"
    run(ip, "present = 5")
    task(ip, "found = [p if 'p' in globals() else None for p in ()]\n"
             "got = (present if 'present' in globals() else 0,\n"
             "       absent if 'absent' in dir() else 'no absent')")  # fmt: skip
    assert ip.user_ns["got"] == (5, "no absent")
    with pytest.raises(CellNameError, match="'typo' is not defined"):  # read unguarded too
        task(ip, "try:\n    typo\nexcept NameError:\n    pass\nprint(typo)")


def test_refusals_are_one_line_before_anything_is_sent(ip: InteractiveShell, nb: Session) -> None:
    with pytest.raises(CellNameError) as undefined:
        task(ip, "print(nowhere)")
    assert isinstance(undefined.value, NameError)
    assert undefined.value._render_traceback_() == ["NameError: name 'nowhere' is not defined"]
    for source, why in [
        ("%pip install six", "acts on this kernel"),
        ("%conda install six", "acts on this kernel"),
        ("%who", "acts on this kernel"),
        ("import ipywidgets\nw = ipywidgets.IntSlider()", "widgets live in the kernel"),
        ("from ipywidgets import interact\ninteract(print, x=1)", "widgets live in the kernel"),
    ]:
        with pytest.raises(CellError, match=why) as refused:
            task(ip, source)
        assert len(refused.value._render_traceback_()) == 1
    with pytest.raises(Exception, match="input"):
        task(ip, "name = input('who? ')")


def test_notebook_app_is_public_and_named_cells_are_reachable(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "base = 10")
    task(ip, "scaled = base * 3", "clean --wait")
    assert nbtask.app() is nb.app
    assert nbtask.app().cells["clean"].delay(base=2).get(timeout=15)["scaled"] == 6


def test_handler_output_is_kept_with_its_task(
    ip: InteractiveShell, nb: Session, settings: Settings, tmp_path: Path
) -> None:
    run(
        ip,
        "from nbtask import app\nclass Audited(app().Task):\n    abstract = True\n"
        "    def on_success(self, retval, task_id, args, kwargs):\n"
        "        print('audited', retval)\n"
        "@app().task(base=Audited)\ndef double(x):\n    return 2 * x\nh = double.delay(21)",
    )
    handle = ip.user_ns["h"]
    assert handle.get(timeout=15) == 42
    wait_until(lambda: "audited 42" in nb.log(handle.id), 10, "the handler's output")
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    shown = subprocess.run(
        [sys.executable, "-m", "nbtask", "log", handle.id, "-b", settings.broker_url or "",
         "--key-prefix", settings.key_prefix, "--secret-file", str(secret)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert shown.returncode == 0 and "audited 42" in shown.stdout, shown.stderr


def test_another_version_on_the_workers_is_named_once(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy

    for worker_id in nb.app.workers():
        nb.app.store.announce_versions(
            worker_id, {"python": sys.version.split()[0], "numpy": "0.1"}
        )
    run(ip, "import numpy as np")
    task(ip, "m = float(np.mean([1, 2]))")
    task(ip, "n = float(np.mean([3, 4]))")
    err = capsys.readouterr().err
    assert err.count(f"numpy is {numpy.__version__} here but 0.1 on worker") == 1


def test_versions_and_worker_ids_from_the_registry_are_shown_without_control_codes(
    ip: InteractiveShell,
    nb: Session,
    access: RawBroker,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both are unsigned: anyone with broker access can announce a worker and its versions."""
    fake = "fake\x1b[5m-worker"
    real = next(iter(nb.app.workers().values()))
    access.store.hset(f"{settings.key_prefix}:workers", fake, real.to_json())
    access.store.set(f"{settings.key_prefix}:hb:{fake}", "1", ex=60)
    access.keys.announce_versions(fake, {"python": "\x1b]0;PWNED\x07\x1b[2J9.9"})
    nb.app.workers()  # cells go by the registry as last read (seconds ago): read it now
    task(ip, "x = 1")
    err = capsys.readouterr().err
    assert "python is" in err and "here but ?]0;PWNED??[2J9.9 on worker fake?[5m-worker" in err
    assert "\x1b" not in err and "\x07" not in err


@pytest.mark.parametrize(
    "later",
    ["%%task --wait\nv = 'later'", "%%task\nv = 'later'\n", "v = 'later'"],
    ids=["a --wait cell", "the same cell run again", "a local cell"],
)
def test_a_name_rebound_while_its_earlier_cell_runs_keeps_the_later_value(
    ip: InteractiveShell, nb: Session, later: str
) -> None:
    """As locally, the cell run last wins, even when the earlier task ends last."""
    task(ip, "warm = 1")  # a shell started on the workers: the later cell ends first
    task(ip, "import time\ntime.sleep(3)\nv = 'earlier'", "--out first")
    assert ip.run_cell(later).success
    assert ip.run_cell("seen = v").success  # waits for the later cell's task, if any
    wait_until(ip.user_ns["first"].done, 20, "the earlier cell's task to end")
    run(ip, "after = v")  # the earlier task's values are harvested before this cell
    assert (ip.user_ns["seen"], ip.user_ns["after"]) == ("later", "later")


def test_status_forgets_tasks_as_they_end(ip: InteractiveShell, nb: Session) -> None:
    task(ip, "import time\ntime.sleep(1)\nslept = 1", "--out h")
    handle = ip.user_ns["h"]
    wait_until(lambda: "busy 1" in nb.status(), 10, "the task to show as busy")
    handle.result(15)
    assert "busy 1" not in nb.status()  # at once, not at the worker's next heartbeat


def test_elapsed_time_is_the_tasks_own(ip: InteractiveShell, nb: Session) -> None:
    sent = time.time()
    task(ip, "import time\ntime.sleep(1.2)\ndone = 1", "--out h")
    handle = ip.user_ns["h"]
    handle.result(15)
    view = nb.views[handle.id]
    wait_until(lambda: view.state is State.SUCCESS, 5, "the view's final state")
    seen = time.time() - sent
    elapsed = view.elapsed()
    # The cell's own run (its 1.2 s sleep), within what the notebook saw, and it stops
    # counting once the task ended, however busy the machine is.
    assert 1.1 <= elapsed <= seen
    time.sleep(0.2)
    assert view.elapsed() == elapsed


@pytest.mark.parametrize("attempt", range(5))
def test_interrupt_while_waiting_always_cancels_under_load(
    ip: InteractiveShell, nb: Session, attempt: int
) -> None:
    import signal
    import threading

    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]  # both cores busy, as on a loaded machine
    try:
        task(ip, "import time\nprint('started')\ntime.sleep(30)\nlate = 1", "--out h")
        handle = ip.user_ns["h"]
        wait_until(lambda: "started" in handle.stdout, 20, "the cell to start")
        started = time.monotonic()
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            nb.pending.wait(["late"])
        assert time.monotonic() - started < 5
        wait_until(handle.done, 15, "the task to stop")
        assert handle.state is State.REVOKED
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def test_one_embedded_cluster_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("NBTASK_")]:
        monkeypatch.delenv(key)
    first, second = App("first"), App("second", secret=None)
    try:
        first.connect()
        second.connect()
        assert first.cluster is second.cluster is not None
        assert second.send_task("nbtask.no.such.task").exception(15) is not None
    finally:
        second.close()
        assert first.cluster is not None and first.cluster.process.poll() is None
        first.close()
