"""A ``%%task`` cell behaves as it would locally: magics, random state, top-level await,
``del``, the notebook's history, partial effects on failure, late-bound names, the cell run
last winning, and one-line refusals."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import rendered, wait_until
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

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
