"""A ``%%task`` cell in a real kernel shows as it would run locally.

What a worker cannot answer (``getpass()``, reading ``sys.stdin``, the debugger) is
refused in one line, as ``input()`` is; ``clear_output(wait=True)`` keeps its ``wait``.
"""

from __future__ import annotations

import bdb
import pdb
import re
import sys
from typing import Any

import pytest
from helpers import execute, kernel_env, stream_text, without_colours
from IPython.core.error import StdinNotImplementedError

from nbtask import Settings
from nbtask.notebook.cell_guards import CellGuards


@pytest.fixture
def kc(settings: Settings, start_worker: Any, kernel: Any) -> Any:
    start_worker()
    client = kernel(kernel_env(settings))[1]
    _, _, reply = execute(client, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    return client


def _plain(lines: list[str]) -> str:
    """A traceback as text, without IPython's colours."""
    return without_colours("\n".join(lines))


def _the_error(msgs: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert len(errors) == 1, [m["msg_type"] for m in msgs]
    return errors[0]


def test_getpass_is_refused_in_one_line_as_input_is(kc: Any) -> None:
    _, msgs, _ = execute(
        kc, "%%task --wait\nimport getpass\nbefore = 1\npw = getpass.getpass('pw: ')"
    )
    error = _the_error(msgs)
    assert error["ename"] == "StdinNotImplementedError", error
    assert error["evalue"].startswith("getpass() cannot be answered in a %%task cell"), error
    shown = _plain(error["traceback"]) + stream_text(msgs)
    assert "pw = getpass.getpass('pw: ')" in shown, shown
    for noise in ("EOFError", "GetPassWarning", "termios"):
        assert noise not in shown, shown
    _, msgs, _ = execute(kc, "print(before)")
    assert stream_text(msgs) == "1\n"  # what ran before it came back, as for any error


@pytest.mark.parametrize(
    "stop", ["breakpoint()", "import pdb; pdb.set_trace()", "import pdb; pdb.Pdb().set_trace()"]
)
def test_the_debugger_in_a_cell_is_refused_in_one_line_not_ended_silently(
    kc: Any, stop: str
) -> None:
    _, msgs, reply = execute(kc, f"%%task --wait\nprint('before')\n{stop}\nprint('after')")
    assert reply["content"]["status"] == "error", reply["content"]
    error = _the_error(msgs)
    assert error["ename"] == "StdinNotImplementedError", error
    assert "the debugger" in error["evalue"], error
    assert "run the cell without %%task to debug it" in error["evalue"], error
    assert stream_text(msgs) == "before\n"
    assert "BdbQuit" not in "\n".join(error["traceback"])
    assert "nbtask" not in _plain(error["traceback"])  # ends at the cell's line
    _, msgs, reply = execute(kc, "%%task --wait\nprint('next cell')")
    assert reply["content"]["status"] == "ok" and stream_text(msgs) == "next cell\n"


@pytest.mark.parametrize(
    ("read", "said"),
    [
        ("sys.stdin.readline()", "sys.stdin.readline()"),
        ("sys.stdin.read()", "sys.stdin.read()"),
        ("[line for line in sys.stdin]", "sys.stdin"),
    ],
)
def test_reading_stdin_in_a_cell_is_refused_in_one_line_as_input_is(
    kc: Any, read: str, said: str
) -> None:
    """Not an empty line at once, as if the user had typed nothing."""
    _, msgs, reply = execute(kc, f"%%task --wait\nimport sys\nbefore_in = 1\ntyped = {read}")
    assert reply["content"]["status"] == "error", reply["content"]
    error = _the_error(msgs)
    assert error["ename"] == "StdinNotImplementedError", error
    assert error["evalue"] == (
        f"{said} cannot be answered in a %%task cell (it runs on a worker): ask for the "
        "value in a cell of its own and use the variable"
    ), error
    shown = _plain(error["traceback"])
    assert f"typed = {read}" in shown and "nbtask" not in shown, shown  # the cell's line
    _, msgs, _ = execute(kc, "print(before_in, 'typed' in globals())")
    assert stream_text(msgs) == "1 False\n"


def test_what_a_cell_is_refused_is_put_back_after_it() -> None:
    """The worker process's own stdin and debugger, for what runs there after the cell."""
    stdin, trace, set_trace = sys.stdin, pdb.Pdb.set_trace, pdb.set_trace
    with CellGuards():
        with pytest.raises(StdinNotImplementedError):
            sys.stdin.readline()
        with pytest.raises(StdinNotImplementedError):
            pdb.Pdb().set_trace()
    assert sys.stdin is stdin
    assert pdb.Pdb.set_trace is trace is bdb.Bdb.set_trace and "set_trace" not in vars(pdb.Pdb)
    assert pdb.set_trace is set_trace


def test_clear_output_keeps_its_wait(kc: Any) -> None:
    cell = (
        "%%task --wait\nfrom IPython.display import clear_output\n"
        "print('one')\nclear_output(wait=True)\nprint('two')\nclear_output()\nprint('three')"
    )
    _, msgs, reply = execute(kc, cell)
    assert reply["content"]["status"] == "ok", reply["content"]
    clears = [m["content"]["wait"] for m in msgs if m["msg_type"] == "clear_output"]
    assert clears == [True, False], clears


def _shown_locally_and_in_a_task_cell(kc: Any, body: str) -> tuple[str, str]:
    """The error ``body`` shows run locally and as a ``%%task --wait`` cell, as plain text."""
    _, msgs, _ = execute(kc, body)
    local = _plain(_the_error(msgs)["traceback"])
    _, msgs, _ = execute(kc, f"%%task --wait\n{body}")
    return local, _plain(_the_error(msgs)["traceback"])


@pytest.mark.parametrize("where", ["in the cell", "in a function of an earlier cell"])
def test_an_exception_with_notes_is_said_once(kc: Any, where: str) -> None:
    raising = "e = ValueError('x')\ne.add_note('a note')\nraise e"
    if where != "in the cell":  # the worker cannot show that frame: its text is filled in here
        execute(kc, "def boom():\n" + "".join(f"    {line}\n" for line in raising.splitlines()))
        raising = "boom()"
    local, shown = _shown_locally_and_in_a_task_cell(kc, raising)
    assert shown.count("ValueError: x") == 1, shown
    # The line a local cell ends with (the text Python gives, where the worker could not
    # show a frame, goes on with the note).
    assert local.splitlines()[-1] in shown, (shown, local)


@pytest.mark.parametrize("where", ["in the cell", "in a function of an earlier cell"])
def test_an_exception_groups_summary_is_said_once(kc: Any, where: str) -> None:
    raising = "raise ExceptionGroup('eg', [ValueError(1), TypeError(2)])"
    if where != "in the cell":
        execute(kc, f"def boom():\n    {raising}\n")
        raising = "boom()"
    local, shown = _shown_locally_and_in_a_task_cell(kc, raising)
    assert shown.count("ExceptionGroup: eg (2 sub-exceptions)") == 1, shown
    assert local.splitlines()[-1] in shown, (shown, local)


def test_what_a_cell_defines_keeps_its_source_in_the_notebook(kc: Any) -> None:
    cell = (
        "%%task --wait\ndef tfun(x):\n    y = x + 1\n    return y\n\ndef bad(v):\n    return v / 0"
    )
    _, _, reply = execute(kc, cell)
    assert reply["content"]["status"] == "ok", reply["content"]
    _, msgs, reply = execute(kc, "import inspect\nprint(inspect.getsource(tfun), end='')")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert stream_text(msgs) == "def tfun(x):\n    y = x + 1\n    return y\n"
    _, msgs, _ = execute(kc, "bad(1)")
    shown = _plain(_the_error(msgs)["traceback"])
    assert "In[2], line 7, in bad" in shown and "----> 7     return v / 0" in shown, shown


def test_a_cell_that_does_not_parse_raises_the_syntax_error_a_local_cell_would(kc: Any) -> None:
    _, msgs, _ = execute(kc, "x_syn = (1,\nprint('no')")
    local = _the_error(msgs)
    _, msgs, reply = execute(kc, "%%task --wait\nx_syn = (1,\nprint('no')")
    assert reply["content"]["status"] == "error", reply["content"]
    error = _the_error(msgs)
    assert (error["ename"], error["evalue"]) == (
        "SyntaxError",
        "incomplete input (Cell In[3], line 3)",
    )
    # Shown as the local cell's: its line and caret, one line down (below %%task).
    said = _plain(local["traceback"]).replace("In[2], line 2", "In[3], line 3")
    assert _plain(error["traceback"]) == said, error["traceback"]
    _, msgs, _ = execute(
        kc,
        "try:\n    get_ipython().run_cell_magic('task', '--wait', 'x = (')\n"
        "except SyntaxError as e:\n    print(type(e).__name__, e.lineno)",
    )
    assert stream_text(msgs) == "SyntaxError 2\n"


def test_a_statement_that_does_not_compile_fails_after_those_before_it_ran(kc: Any) -> None:
    """``return`` outside a function: the kernel runs the lines before it, then refuses it."""
    _, msgs, _ = execute(kc, "q_ret = 1\nreturn q_ret")
    local = _the_error(msgs)
    _, msgs, _ = execute(kc, "print(q_ret)\ndel q_ret")
    assert stream_text(msgs) == "1\n"
    _, msgs, reply = execute(kc, "%%task --wait\nq_ret = 1\nreturn q_ret")
    assert reply["content"]["status"] == "error", reply["content"]
    error = _the_error(msgs)
    assert (error["ename"], error["evalue"]) == (
        "SyntaxError",
        "'return' outside function (Cell In[4], line 3)",
    )
    # Its line and caret alone, as the local cell's, one line down (below %%task): not
    # below the frames of the magic, which raised it in the kernel.
    said = [line.replace("In[2], line 2", "In[4], line 3") for line in local["traceback"]]
    assert error["traceback"] == said, error["traceback"]
    _, msgs, _ = execute(kc, "print(q_ret)")
    assert stream_text(msgs) == "1\n"


def _cell_lines_moved(shown: dict[str, Any], below: int) -> list[str]:
    """An error's traceback, plain, its own cell's lines counted ``below`` lines down.

    That cell is named ``Cell In[N]``, whatever its number: a ``%%task`` cell's lines are
    counted one down (below the ``%%task`` line), the same code run locally is not.
    """
    number = shown["execution_count"]

    def moved(found: re.Match[str]) -> str:
        if int(found[1]) != number:  # an earlier cell's, the same either way
            return found[0]
        return f"Cell In[N], line {int(found[2]) + below}"

    return [_CELL_LINE.sub(moved, without_colours(line)) for line in shown["traceback"]]


_CELL_LINE = re.compile(r"Cell In\[(\d+)\], line (\d+)")


@pytest.mark.parametrize(
    "raising",
    [
        'q_rt = 1\ncompile("x x", "f", "exec")',
        'def q_exec():\n    exec("1 +")\nq_exec()',
        'q_rt = 1\nexec("  x")',  # an IndentationError
        "q_earlier()",  # through a function of an earlier cell, whose lines only the kernel has
    ],
)
def test_a_syntax_error_the_cells_code_raises_shows_as_in_a_local_cell(
    kc: Any, raising: str
) -> None:
    """As IPython shows any SyntaxError raised as a cell runs: the frames, then its place.

    The frames are those a local cell's would be, not the magic's that raised it again.
    """
    execute(kc, 'def q_earlier():\n    compile("(", "g", "exec")')
    errors = []
    for cell in (raising, f"%%task --wait\n{raising}"):
        _, msgs, reply = execute(kc, cell)
        assert reply["content"]["status"] == "error", reply["content"]
        errors.append({**_the_error(msgs), "execution_count": reply["content"]["execution_count"]})
    local, task = errors
    assert (task["ename"], task["evalue"]) == (local["ename"], local["evalue"]), task
    shown = _cell_lines_moved(task, 0)
    assert shown == _cell_lines_moved(local, 1), shown


def test_a_background_cells_syntax_error_says_which_cell_above_its_frames(kc: Any) -> None:
    """Raised in a later cell that reads its names, as any error of a background cell."""
    _, _, reply = execute(kc, '%%task\nq_bg = 1\ncompile("x x", "f", "exec")')
    assert reply["content"]["status"] == "ok", reply["content"]
    _, msgs, reply = execute(kc, "print(q_bg)")
    assert reply["content"]["status"] == "error", reply["content"]
    error = _the_error(msgs)
    shown = [without_colours(line) for line in error["traceback"]]
    assert shown[0].startswith("nbtask: task 'q_bg = 1' ["), shown
    assert shown[0].endswith(
        "failed in the background; the names it bound before its error are set:"
    )
    # The cell's frame on the worker, then the error's place: not nbtask's frames.
    assert shown[1:3] == [
        "Traceback (most recent call last):\n",
        '  Cell In[2], line 3\n    compile("x x", "f", "exec")\n',
    ], shown
    assert shown[3:] == ["  File f:1\n    x x\n      ^\nSyntaxError: invalid syntax\n"], shown


def test_debug_after_a_cells_error_says_its_frames_are_on_the_worker(kc: Any) -> None:
    cell = "%%task --wait\ndef g5(v):\n    w = v + 10\n    return 1 / v\ng5(0)"
    _, msgs, _ = execute(kc, cell)
    assert _the_error(msgs)["ename"] == "ZeroDivisionError"
    said = "the error was raised on a worker, and its frames are not in this kernel"
    _, msgs, _ = execute(kc, "%debug", allow_stdin=False)
    execute(kc, "%pdb on")
    _, again, _ = execute(kc, cell, allow_stdin=False)
    for text in (stream_text(msgs), stream_text(again)):
        assert said in text and "run the cell without %%task to debug it" in text, text
        assert "pending.py" not in text and "ipdb>" not in text, text
    execute(kc, "%pdb off")
    execute(kc, "1 / 0")  # a local error is debugged as IPython would
    _, msgs, _ = execute(kc, "%debug", allow_stdin=False)
    assert said not in stream_text(msgs)
