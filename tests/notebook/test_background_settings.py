"""A background cell's changes to process-wide state, when the notebook changed it meanwhile.

Locally, cells run one after the other. A background cell (``%%task`` without ``--wait``)
was sent the notebook's settings and random generators as they were then; while it ran,
the notebook went on. When its changes come back, a setting the notebook changed meanwhile
is merged key by key: the cell's changes to the keys the notebook left alone apply, and for
a key both changed the notebook's stays, one line saying so. A random generator is one
value: one the notebook drew from meanwhile keeps the notebook's state (the cell drew the
same numbers from its copy: one line says so). Through a real kernel (jupyter_client) and
real worker processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _held(flag: Path) -> str:
    """Lines of a background cell that runs on until ``flag`` exists (a minute at most).

    It reads ``os`` and ``time``, imported by the notebook: a cell importing them would
    assign them, and a local cell reading them would wait for it.
    """
    return (
        "until = time.monotonic() + 60\n"
        f"while not os.path.exists({str(flag)!r}) and time.monotonic() < until:\n"
        "    time.sleep(0.05)\n"
    )


def test_a_background_cells_draws_do_not_undo_the_notebooks_draws_made_meanwhile(
    run_in_kernel: Callable[[str], str], tmp_path: Path
) -> None:
    """Before, the cell's end state was applied: the notebook's next draws repeated its own."""
    flag = tmp_path / "go"
    run_in_kernel("import os, random, time\nimport numpy as np\nnp.random.seed(0)\nrandom.seed(0)")
    run_in_kernel(f"%%task bg\nb1 = np.random.rand()\nr1 = random.random()\n{_held(flag)}")
    # Cells run while it runs draw from the notebook's generators: three draws each.
    run_in_kernel("l1 = np.random.rand(3)\nm1 = [random.random() for _ in range(3)]")
    flag.touch()
    said = run_in_kernel("print(b1 == l1[0], r1 == m1[0])")
    assert "True True" in said  # the cell drew from the copy it was sent: the same numbers
    assert "nbtask: task 'bg' [" in said
    assert (
        "drew from the same random state as the notebook did meanwhile (its draws repeat "
        "those of the notebook), so its end state was not applied" in said
    )
    assert "numpy.random" in said and "random" in said and "seed inside the cell" in said
    # The notebook's draws are not undone: the next ones follow on from them.
    numbers, generator = np.random.RandomState(0).rand(4), random.Random(0)
    following = [generator.random() for _ in range(4)][3]
    printed = run_in_kernel("print(repr(float(np.random.rand())), repr(random.random()))")
    assert printed.split() == [repr(float(numbers[3])), repr(following)]

    # A cell the notebook drew nothing beside: its end state comes back, as locally.
    run_in_kernel("np.random.seed(1)")
    run_in_kernel("%%task bg2\nb2 = np.random.rand(2)")
    said = run_in_kernel("print(repr(float(b2[1])))\nprint(repr(float(np.random.rand())))")
    assert said.split()[-2:] == [repr(float(x)) for x in np.random.RandomState(1).rand(3)[1:]]
    assert "not applied" not in said


def test_a_setting_the_notebook_changed_while_a_background_cell_ran_is_merged_key_by_key(
    run_in_kernel: Callable[[str], str], tmp_path: Path
) -> None:
    """Before, the cell's whole numpy print options and decimal context were applied: the
    notebook's ``suppress=True`` and rounding set meanwhile were lost."""
    flag = tmp_path / "go"
    run_in_kernel("import decimal, os, time\nimport numpy as np\nimport pandas as pd")
    run_in_kernel(
        f"%%task bg\n{_held(flag)}"
        "np.set_printoptions(precision=3, linewidth=100)\n"
        "pd.set_option('display.max_rows', 7)\n"
        "pd.set_option('display.width', 100)\n"
        "decimal.getcontext().prec = 10\n"
        # (Through a name of its own: one changing os.environ makes os a name it changes,
        # which a local cell reading os would wait for.)
        "import os as cell_os\n"
        "cell_os.environ['NBTEST_BOTH'] = 'cell'\n"
        "cell_os.environ['NBTEST_CELL'] = 'cell'\n"
        "done = 1"
    )
    run_in_kernel(
        "np.set_printoptions(suppress=True, linewidth=90)\n"
        "pd.set_option('display.max_columns', 5)\n"
        "pd.set_option('display.width', 90)\n"
        "decimal.getcontext().rounding = decimal.ROUND_UP\n"
        "os.environ['NBTEST_BOTH'] = 'notebook'"
    )
    flag.touch()
    said = run_in_kernel("print(done)")
    lines = [line for line in said.splitlines() if line.startswith("nbtask: task 'bg' [")]
    assert len(lines) == 1, said  # one line, naming each setting and key both changed
    assert "numpy's print options (linewidth)" in lines[0]
    assert "pandas' options (display.width)" in lines[0]
    assert "environment variables (NBTEST_BOTH)" in lines[0]
    assert "the notebook's values are kept" in lines[0]
    assert "precision" not in lines[0] and "decimal" not in lines[0]
    printed = run_in_kernel(
        "o, c = np.get_printoptions(), decimal.getcontext()\n"
        "print(o['precision'], o['suppress'], o['linewidth'], pd.get_option('display.max_rows'),"
        " pd.get_option('display.max_columns'), pd.get_option('display.width'), c.prec,"
        " c.rounding, os.environ['NBTEST_BOTH'], os.environ['NBTEST_CELL'])"
    )
    assert printed.split() == [
        *("3", "True", "90"),  # the cell's precision, the notebook's suppress and linewidth
        *("7", "5", "90"),
        *("10", "ROUND_UP"),
        *("notebook", "cell"),
    ]


def test_a_later_background_cells_setting_wins_over_an_earlier_ones_as_sequentially(
    run_in_kernel: Callable[[str], str], tmp_path: Path
) -> None:
    """What an earlier cell's changes made of the notebook's settings, when they came back
    while a later cell ran, is not the notebook's own change: the later cell's wins."""
    first, second = tmp_path / "first", tmp_path / "second"
    run_in_kernel("import os, time\nimport numpy as np")
    run_in_kernel(f"%%task early\n{_held(first)}np.set_printoptions(precision=3)\na = 1")
    run_in_kernel(f"%%task late\n{_held(second)}np.set_printoptions(precision=5)\nb = 2")
    first.touch()
    assert run_in_kernel("print(a, np.get_printoptions()['precision'])").endswith("\n1 3\n")
    second.touch()
    said = run_in_kernel("print(b, np.get_printoptions()['precision'])")
    assert said.endswith("\n2 5\n") and "kept" not in said
