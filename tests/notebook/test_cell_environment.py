"""A ``%%task`` cell carries the notebook's process-wide state as a local cell would:
matplotlib's settings, the environment, the working directory and ``sys.path`` follow the
notebook both ways, and nothing another cell, task, thread, notebook or dataset left on
the worker reaches the next cell."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from helpers import ROOT, broker_env
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client.manager import KernelManager

from nbtask import Settings
from nbtask.notebook.session import Session


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
