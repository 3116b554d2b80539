"""A thread a ``%%task`` cell leaves running keeps its cell's names, as in a kernel.

Its functions' globals are the namespace the cell ran in: it goes on reading and writing
that cell's names after its worker process ran other cells, which never see them, nor it
theirs (they may be another notebook's). Without such a thread, a cell's namespace is
emptied as the next cell begins, freeing its values at once.

A real kernel and a real IPython shell, against the real Redis and a worker with one
process (each cell runs in the one before's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import cell_task, execute, kernel_env, stream_text, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.session import Session

#: A thread that counts in its cell's ``count`` and writes ``mark count`` to a file every
#: tick, or what it raised (it then stops). ``seen`` and ``leaked`` for the second test.
_TICKER = """\
import os, threading, time
out = {out!r}
mark = "cell one"
count = 0
def tick(out=out):
    global count, leaked
    for _ in range(600):
        try:
            count += 1
            leaked = mark
            seen = sorted(n for n in globals() if n.startswith("b_"))
            with open(out + ".tmp", "w") as f:
                f.write(f"{{mark}} {{count}} {{seen}}")
            os.replace(out + ".tmp", out)
            time.sleep(0.02)
        except Exception as exc:
            with open(out, "w") as f:
                f.write(f"{{type(exc).__name__}}: {{exc}}")
            return
threading.Thread(target=tick, daemon=True).start()
while not os.path.exists(out):
    time.sleep(0.01)"""


def _ticks(out: Path) -> int:
    """How many times the thread ticked so far; the test fails with what it raised."""
    text = out.read_text()
    assert text.startswith("cell one "), text
    return int(text.split()[2])


def _ticked_since(out: Path, ticks: int) -> None:
    """Wait until the thread ticked twice more than ``ticks`` (or fail with its error)."""
    wait_until(lambda: _ticks(out) > ticks + 1, 15, "the thread to tick on")


@pytest.fixture
def one_process(loaded: Session, start_worker: Any) -> Any:
    """The extension loaded, and a worker with one process (each cell runs in it)."""
    return start_worker(concurrency=1)


def test_a_thread_left_running_reads_and_writes_its_cells_names_after_the_next_cell(
    ip: InteractiveShell, one_process: Any, tmp_path: Path
) -> None:
    """The thread's ``count``, ``mark`` and ``os`` are still its cell's while the next
    cell (which binds a ``count`` and a ``mark`` of its own) runs, and after it. Before,
    the next cell's start emptied that namespace: the thread raised a NameError."""
    out = tmp_path / "ticks"
    cell_task(ip, _TICKER.format(out=str(out)))
    cell_task(ip, "import time\nmark, count = 'cell two', -1000\ntime.sleep(0.5)\nafter = count")
    assert ip.user_ns["after"] == -1000  # the thread's count is not the cell's
    _ticked_since(out, _ticks(out))
    cell_task(ip, "x = 1")
    _ticked_since(out, _ticks(out))
    assert out.read_text().endswith(" []"), out.read_text()  # no b_ name of another cell


def test_a_cell_of_another_notebook_and_the_thread_never_see_each_others_names(
    ip: InteractiveShell, one_process: Any, settings: Settings, kernel: Any, tmp_path: Path
) -> None:
    """Another notebook's cell, in the same worker process while the thread runs, finds
    none of the names the thread writes (``leaked``) and the thread none of the cell's
    (``b_secret``). Before, both shared the one namespace: each saw the other's names."""
    out = tmp_path / "ticks"
    cell_task(ip, _TICKER.format(out=str(out)))
    kc = kernel(kernel_env(settings))[1]
    _, _, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    cell = (
        "%%task --wait\nimport time\nb_secret = 'b'\ntime.sleep(0.5)\n"
        "print(sorted(n for n in globals() if n in ('leaked', 'count', 'mark', 'tick')))"
    )
    ticks = _ticks(out)
    _, msgs, reply = execute(kc, cell)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert stream_text(msgs) == "[]\n", stream_text(msgs)
    _, msgs, reply = execute(kc, "print(sorted(n for n in ('leaked', 'count') if n in globals()))")
    assert stream_text(msgs) == "[]\n", stream_text(msgs)  # nothing of the thread's came back
    assert _ticks(out) > ticks + 10  # (it ticked while that cell ran)
    _ticked_since(out, _ticks(out))
    assert out.read_text().endswith(" []"), out.read_text()


def test_without_a_thread_left_running_a_cells_values_are_freed_as_the_next_begins(
    ip: InteractiveShell, one_process: Any
) -> None:
    """Its namespace is emptied then: its values are not left to the garbage collector
    (a function the cell defined refers back to the namespace that holds them)."""
    cell_task(
        ip,
        "import sys, weakref\nclass Big:\n    pass\nbig = Big()\ndef f():\n    return big\n"
        "sys.nbtask_test_ref = weakref.ref(big)",
    )
    cell_task(ip, "import sys\nalive = sys.nbtask_test_ref() is not None\ndel sys.nbtask_test_ref")
    assert ip.user_ns["alive"] is False


def test_a_thread_an_earlier_cell_left_running_keeps_no_later_cells_values(
    ip: InteractiveShell, one_process: Any
) -> None:
    """Only the namespace of the cell that started a thread stays with it: the cells after
    it are freed as the next begins. Before, while any such thread lived, every cell's
    values waited for the garbage collector (400 MB more per cell)."""
    cell_task(
        ip,
        "import sys, threading\nsys.nbtask_test_stop = threading.Event()\n"
        "threading.Thread(target=sys.nbtask_test_stop.wait, args=(60,), daemon=True).start()",
    )
    try:
        test_without_a_thread_left_running_a_cells_values_are_freed_as_the_next_begins(
            ip, one_process
        )
    finally:
        cell_task(ip, "import sys\nsys.nbtask_test_stop.set()")


def test_a_cell_finds_its_own_names_through_main_as_pickle_does(
    ip: InteractiveShell, one_process: Any
) -> None:
    """``sys.modules['__main__']`` is each cell's namespace (``pickle`` finds the cell's
    classes and functions there by name, as a ``multiprocessing`` pool's would)."""
    for value in (1, 2):
        cell_task(
            ip,
            f"import pickle\nclass Point:\n    v = {value}\n"
            "again = pickle.loads(pickle.dumps(Point))\ngot, same = again.v, again is Point",
        )
        assert (ip.user_ns["got"], ip.user_ns["same"]) == (value, True)


def test_a_cell_ends_well_while_a_thread_it_left_running_binds_new_names(
    ip: InteractiveShell, one_process: Any
) -> None:
    """What the cell bound is read from its namespace while the thread adds to it: the
    names bound by then come back, as they would be in a kernel's namespace."""
    cell_task(
        ip,
        "import threading, time\n"
        "def grow():\n    for i in range(200_000):\n        globals()[f'g{i}'] = i\n"
        "        if i % 50 == 0:\n            time.sleep(0.0005)\n"
        "threading.Thread(target=grow, daemon=True).start()\n"
        "time.sleep(0.3)",
    )
    grown = sorted(n for n in ip.user_ns if n.startswith("g") and n[1:].isdigit())
    assert len(grown) > 100, len(grown)
