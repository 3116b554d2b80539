"""How a ``--wait`` cell ends, as it would locally: its last expression is its ``Out`` (the
value itself), and interrupted, the names it bound so far stay bound. A background cell's
status line in a terminal ends no line the cell printed in pieces.

A real IPython shell against the real Redis and worker processes.
"""

from __future__ import annotations

import pytest
from helpers import cell_run as run
from helpers import interrupt_once_printed, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import State
from nbtask.notebook.session import Session


def shown(ip: InteractiveShell, cell: str) -> None:
    """Run ``%%task --wait`` ``cell`` as a notebook cell (numbered, its ``Out`` kept)."""
    result = ip.run_cell(f"%%task --wait\n{cell}", store_history=True)
    assert result.error_in_exec is None and result.error_before_exec is None, result


def test_the_last_expression_is_the_value_itself_in_out_and_underscore(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "x = 21")
    shown(ip, "x * 2")
    count = ip.execution_count - 1
    assert type(ip.user_ns["_"]) is int and ip.user_ns["_"] == 42
    assert ip.user_ns["Out"][count] == 42 and ip.user_ns[f"_{count}"] == 42
    # A name the cell assigns and shows is one object, as locally, sent once.
    shown(ip, "rows = [1, 2]\nrows")
    assert ip.user_ns["_"] is ip.user_ns["rows"] and ip.user_ns["__"] == 42
    # So is a shipped name the cell only shows.
    shown(ip, "x")
    assert ip.user_ns["_"] is ip.user_ns["x"]


def test_a_cell_ending_with_a_semicolon_or_none_shows_nothing(
    ip: InteractiveShell, nb: Session
) -> None:
    shown(ip, "x = 21\nx")
    count = ip.execution_count
    shown(ip, "x * 3;")
    shown(ip, "None")
    assert ip.user_ns["_"] == 21
    assert count not in ip.user_ns["Out"] and count + 1 not in ip.user_ns["Out"]


def test_a_value_that_cannot_be_pickled_shows_the_workers_display_and_says_so(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    shown(ip, "(i for i in range(3))")
    count = ip.execution_count - 1
    assert repr(ip.user_ns["_"]).startswith("<generator object <genexpr> at")
    said = capsys.readouterr().err
    assert f"nbtask: Out[{count}] did not come back from the worker (generator cannot" in said
    assert "it shows the worker's display of the value" in said


def test_an_interrupted_cell_leaves_the_names_it_bound_so_far(
    ip: InteractiveShell, nb: Session
) -> None:
    """The kernel's interrupt (the Stop button) stops the cell as locally: its names stay."""

    interrupt_once_printed(ip)
    cell = "total = 0\nprint('started')\nfor i in range(10**10):\n    total += i\nlate = 1"
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        ip.run_cell_magic("task", "--wait --out h", cell)
    # Bound when the cell ends, as locally: no later cell has to wait for them.
    i, total = ip.user_ns.get("i"), ip.user_ns.get("total")
    assert isinstance(i, int) and i > 0, "the loop's name did not come back"
    assert total in (i * (i + 1) // 2, i * (i - 1) // 2)  # stopped within a step
    assert "late" not in ip.user_ns and ip.user_ns["h"].state is State.REVOKED


def test_a_shown_object_of_a_notebook_class_reads_the_notebooks_names(
    ip: InteractiveShell, nb: Session
) -> None:
    """Rendered in the kernel, its methods find the notebook's names, as locally."""
    run(
        ip,
        "class Named:\n    def __init__(self, name):\n        self.name = name\n"
        "    def __repr__(self):\n        return f'{self.name} = {eval(self.name)!r}'",
    )
    shown(ip, "later = 5\nNamed('later')")
    assert repr(ip.user_ns["_"]) == "later = 5"


def test_a_background_cells_status_never_cuts_a_line_it_prints_in_pieces(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a terminal, ``print(i, end="")`` shows ``012`` as locally, the status after it."""
    cell = "import time\nfor i in range(3):\n    print(i, end='')\n    time.sleep(0.4)"
    ip.run_cell_magic("task", "--out h", cell)
    run(ip, "finished = h.result(30)")
    seen: list[str] = []

    def said_it_ended() -> bool:
        seen.append(capsys.readouterr().out)
        return "SUCCESS" in "".join(seen)

    wait_until(said_it_ended, 15, "the view to say the task ended")
    printed = "".join(seen)
    assert "012\n[" in printed, printed  # not "0[...] STARTED", nor "012[...] SUCCESS"
