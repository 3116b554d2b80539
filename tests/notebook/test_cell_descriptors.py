"""What a ``%%task`` cell's process writes to its descriptors 1 and 2 shows in the cell.

As in a kernel (which captures its own descriptors 1 and 2): ``os.system``, a subprocess
run without capturing its output, C code's ``printf``, ``faulthandler``. The worker's own
log lines still go to its log; descriptors 1 and 2 are the worker's log again once the cell
ends, however it ends; what a process the cell left running writes later goes to the
worker's log, never into a later cell.

A real kernel and a real IPython shell, against the real Redis and worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers import execute, interrupt_once_printed, kernel_env, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.session import Session

_IN_ORDER = """\
%%task --wait
import os, subprocess, sys
print('one', flush=True)
os.system('echo two')
print('three')
subprocess.run([sys.executable, '-c', 'import sys; print("four"); print("five", file=sys.stderr)'])
print('six', file=sys.stderr)
os.write(1, b'seven\\n')
os.system('echo eight >&2')
print('nine')"""


def streams(msgs: list[dict[str, Any]]) -> dict[str, str]:
    """The text of a kernel's ``stream`` messages, by stream name."""
    text: dict[str, str] = {"stdout": "", "stderr": ""}
    for m in msgs:
        if m["msg_type"] == "stream":
            text[m["content"]["name"]] += m["content"]["text"]
    return text


@pytest.fixture
def worker_and_kernel(settings: Settings, start_worker: Any, kernel: Any) -> tuple[Any, Any]:
    """A worker with one process (so each cell runs in the one before's) and a kernel."""
    worker = start_worker(concurrency=1)
    kc = kernel(kernel_env(settings))[1]
    _, _, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    return worker, kc


def test_what_a_cells_subprocesses_write_shows_in_its_streams_in_order(
    worker_and_kernel: tuple[Any, Any],
) -> None:
    """``os.system`` and ``subprocess.run`` in the cell's stdout and stderr, in their place
    among its prints; the worker's own log lines in its log, not in the cell."""
    worker, kc = worker_and_kernel
    cell = _IN_ORDER + "\nimport logging\nlogging.getLogger('nbtask.worker').warning('own line')"
    _, msgs, reply = execute(kc, cell)
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = streams(msgs)
    assert shown["stdout"] == "one\ntwo\nthree\nfour\nseven\nnine\n", shown
    assert shown["stderr"] == "five\nsix\neight\n", shown
    wait_until(lambda: "own line" in worker.log.read_text(), 15, "the worker's own log line")
    log = worker.log.read_text()
    assert "two" not in log.split() and "five" not in log.split(), log


def test_c_code_and_faulthandler_output_shows_in_the_cell(
    worker_and_kernel: tuple[Any, Any],
) -> None:
    """A C library's ``printf`` (buffered by C until the cell ends) and a traceback dump
    ``faulthandler`` writes to ``sys.stderr``'s descriptor."""
    _, kc = worker_and_kernel
    cell = (
        "%%task --wait\nimport ctypes, faulthandler, sys\n"
        "ctypes.CDLL(None).printf(b'from C %d\\n', 42)\n"
        "faulthandler.dump_traceback(file=sys.stderr)\nprint('python')"
    )
    _, msgs, reply = execute(kc, cell)
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = streams(msgs)
    assert "from C 42\n" in shown["stdout"] and "python\n" in shown["stdout"], shown
    assert "most recent call first" in shown["stderr"], shown


@pytest.fixture
def one_process(loaded: Session, start_worker: Any) -> Any:
    """The extension loaded, and a worker with one process (each cell runs in it)."""
    return start_worker(concurrency=1)


def descriptors_of(pid: int) -> list[str]:
    """What descriptors 1 and 2 of process ``pid`` are."""
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)]


@pytest.mark.parametrize(
    ("how", "line", "code"),
    [
        ("fails", "--wait", "raise ValueError('the cell fails')"),
        ("stopped", "--wait --out h", "time.sleep(30)"),
        ("times out", "--wait --timeout 10", "time.sleep(60)"),
    ],
)
def test_a_cells_descriptors_are_the_workers_log_again_however_it_ends(
    ip: InteractiveShell,
    one_process: Any,
    capsys: pytest.CaptureFixture[str],
    how: str,
    line: str,
    code: str,
) -> None:
    worker = one_process
    # The one process's shell made first (a timeout counts from the sending).
    ip.run_cell_magic("task", "--wait", "import os\npid = os.getpid()")
    pid = ip.user_ns["pid"]
    if how == "stopped":
        interrupt_once_printed(ip)
    result = ip.run_cell(f"%%task {line}\nimport os, time\nos.system('echo started')\n{code}")
    assert result.error_in_exec is not None, how
    assert "started\n" in capsys.readouterr().out, how
    # (A cell that timed out is being stopped on the worker when the notebook goes on.)
    restored = lambda: descriptors_of(pid) == [str(worker.log)] * 2  # noqa: E731
    wait_until(restored, 15, "descriptors 1 and 2 to be the worker's log again")


def test_what_a_process_the_cell_left_running_writes_goes_to_the_workers_log(
    ip: InteractiveShell, one_process: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not into the cell that runs when it writes; the worker goes on serving cells."""
    worker = one_process
    # The cell waits for the first line, written before the file is made.
    ip.run_cell_magic(
        "task",
        "--wait",
        "import os, subprocess, tempfile, time\nmark = tempfile.mktemp()\n"
        "subprocess.Popen(['sh', '-c', f'echo at once; touch {mark}; sleep 2; echo left over'])\n"
        "while not os.path.exists(mark):\n    time.sleep(0.01)\nos.remove(mark)",
    )
    ip.run_cell_magic("task", "--wait", "import time\ntime.sleep(5)\nprint('later cell')")
    shown = capsys.readouterr().out
    assert shown == "at once\nlater cell\n", shown
    wait_until(lambda: "left over" in worker.log.read_text(), 15, "the output in the log")
    ip.run_cell_magic("task", "--wait", "import os\nos.system('echo still served')")
    assert capsys.readouterr().out == "still served\n"
    assert "still served" not in Path(worker.log).read_text()


def test_a_function_tasks_descriptor_output_still_goes_to_the_workers_log(
    ip: InteractiveShell, one_process: Any
) -> None:
    """Only cells take their process's descriptors: a function task's prints are its
    output, what its subprocesses write is the worker's log's, as before."""
    worker = one_process
    ip.run_cell_magic(
        "task", "--wait", "import os\nos.system('echo from a cell')"
    )  # (the process has taken a cell's descriptors once)
    code = (
        "import nbtask, os\n@nbtask.app().task\ndef shout():\n"
        "    os.system('echo from a function task')\n    print('printed')\n"
        "h = shout.delay()\nh.get(timeout=30)"
    )
    run_result = ip.run_cell(code)
    assert run_result.error_in_exec is None, run_result
    assert ip.user_ns["h"].stdout == "printed\n"
    wait_until(lambda: "from a function task" in worker.log.read_text(), 15, "the log line")
    assert "from a cell" not in worker.log.read_text()


def test_what_a_thread_an_earlier_cell_left_running_writes_reaches_no_later_cell(
    ip: InteractiveShell, one_process: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its descriptor writes go to the worker's log while it lives, as its prints are
    dropped: the later cell may be another notebook's. Before, they showed in it."""
    worker = one_process
    ip.run_cell_magic(
        "task",
        "--wait",
        "import threading\n"
        "def tick():\n    import os, time\n    for _ in range(15):\n"
        "        os.write(1, b'fd tick\\n')\n        time.sleep(0.2)\n"
        "threading.Thread(target=tick, daemon=True).start()",
    )
    capsys.readouterr()  # (what it wrote while its cell ran is that cell's)
    ip.run_cell_magic("task", "--wait", "import time\ntime.sleep(2)\nprint('later cell')")
    shown = capsys.readouterr().out
    assert shown == "later cell\n", shown
    wait_until(lambda: "fd tick" in worker.log.read_text(), 15, "the ticks in the log")
