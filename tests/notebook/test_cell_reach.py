"""What a ``%%task`` cell reaches and gives back as it would locally: notebook names its
functions declare ``global``, names in the code strings it runs, and the handle ``--out``
binds."""

from __future__ import annotations

import cloudpickle
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask import State
from nbtask.errors import CellError
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


def test_the_handle_out_binds_gives_the_cells_values(ip: InteractiveShell, nb: Session) -> None:
    """As ``app.cells[name].delay().get()`` does; the values are the notebook's objects."""
    run(ip, "base = 8")
    task(ip, "zz = base + 1\nyy = [zz + 1]", "named --out h")  # in the background
    h = ip.user_ns["h"]
    values = h.get(timeout=30)
    assert values == {"zz": 9, "yy": [10]}
    assert values["yy"] is ip.user_ns["yy"]
    assert values == nb.app.cells["named"].delay().get(timeout=30)
    assert (h.state, h.id, h.ready(), h.wait(5)) == (State.SUCCESS, h.handle.id, True, values)
    task(ip, "ww = [base]", "--wait --out h2")
    assert ip.user_ns["h2"].result(30) == {"ww": [8]}
    task(ip, "import time\ntime.sleep(1)\nvv = 1\nuu = 2", "--out h4")
    run(ip, "uu = 3")  # a later value wins, as locally
    assert ip.user_ns["h4"].get(timeout=30).keys() == {"time", "vv"}
    task(ip, "tt = 5", "--out h5")
    ip.user_ns["h5"].handle.get(timeout=30)
    run(ip, "pass")  # written into the notebook as this cell starts
    assert ip.user_ns["h5"].get(timeout=30) == {"tt": 5}
    with pytest.raises(CellError, match="stands for values in this notebook"):
        cloudpickle.dumps(h)  # f.delay(h) would give the worker nothing of the cell's
    task(ip, "fails = 1\nraise ValueError('no luck')", "--out h3")
    with pytest.raises(Exception, match="no luck"):
        ip.user_ns["h3"].get(timeout=30)
    assert isinstance(ip.user_ns["h3"].get(timeout=30, propagate=False), Exception)
