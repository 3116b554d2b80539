"""What a ``%%task`` cell reaches and gives back as it would locally: notebook names its
functions declare ``global``, names in the code strings it runs, and the handle ``--out``
binds."""

from __future__ import annotations

from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session


def test_a_function_of_the_cell_updates_a_notebook_global(
    ip: InteractiveShell, nb: Session
) -> None:
    """``global counter`` in a function the cell defines: the notebook's ``counter``."""
    run(ip, "counter = 0")
    task(ip, "def bump():\n    global counter\n    counter += 1\nbump(); bump()")
    assert ip.user_ns["counter"] == 2
    # Read only, by a function the cell calls.
    task(ip, "def show():\n    global counter\n    return counter * 10\nshown = show()")
    assert ip.user_ns["shown"] == 20
    # Declared global at the cell's top level, read and bound in an ``if``.
    task(ip, "global counter\nif counter:\n    counter = counter + 1")
    assert ip.user_ns["counter"] == 3


def test_a_statement_string_the_cell_executes_reads_notebook_names(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "total = 10\nbase = 2")
    task(ip, "exec('ee = total + 1')\nco = compile('ff = base * 3', 'f', 'exec')\nexec(co)")
    assert (ip.user_ns["ee"], ip.user_ns["ff"]) == (11, 6)
