"""A cell that touches what a background cell is changing waits for it, or keeps its change.

Locally, cells run one after the other: a change the notebook makes to an object after a
cell is made on top of that cell's. A later cell that reaches an object a background cell
still running may change waits for it, whether it names it, another name bound to it, or
a notebook function that reads it; a change made where no guard can see (an attribute of
an unrelated object, ``exec``) is not undone when the cell's values come back. Through a
real kernel (jupyter_client) and real worker processes.
"""

from __future__ import annotations

from collections.abc import Callable

_BACKGROUND = "%%task bg\nimport time\ntime.sleep(3)\nlst.append(2)"


def test_a_cell_changing_another_name_of_a_pending_object_waits_for_its_cell(
    run_in_kernel: Callable[[str], str],
) -> None:
    run_in_kernel("lst = [1]\nalias = lst")
    run_in_kernel(_BACKGROUND)
    said = run_in_kernel("alias.append(4)\nlst.append(5)")
    # Each name the cell assigns once, with the other names it is read by.
    assert (
        "waiting for task 'bg' [" in said
        and "], which assigns lst (alias is the same object)\n" in said
    )
    assert "[1, 2, 4, 5] [1, 2, 4, 5] True" in run_in_kernel("print(lst, alias, lst is alias)")


def test_a_cell_calling_a_function_that_changes_a_pending_value_waits_for_its_cell(
    run_in_kernel: Callable[[str], str],
) -> None:
    run_in_kernel("lst = [1]\ndef add3():\n    lst.append(3)")
    run_in_kernel(_BACKGROUND)
    said = run_in_kernel("add3()")
    assert "waiting for task 'bg'" in said and "which assigns lst" in said
    assert "[1, 2, 3]" in run_in_kernel("print(lst)")


def test_a_change_no_guard_sees_is_kept_and_the_cells_change_to_it_is_said_not_applied(
    run_in_kernel: Callable[[str], str],
) -> None:
    """Through an attribute of another object, or ``exec``: the notebook's change stays."""
    run_in_kernel("lst = [1]\nclass Box:\n    pass\nbox = Box()\nbox.items = lst")
    run_in_kernel(_BACKGROUND)
    assert "waiting" not in run_in_kernel("box.items.append(4)")  # no guard sees lst in it
    said = run_in_kernel("import time\ntime.sleep(5)\nprint(lst, box.items is lst)")
    assert "[1, 4] True" in said
    assert "lst: the changes task 'bg'" in said and "were not applied" in said
    assert "--wait" in said

    run_in_kernel("d = {'a': 1}")
    run_in_kernel("%%task bg2\nimport time\ntime.sleep(3)\nd['b'] = 2")
    assert "waiting" not in run_in_kernel("exec(\"d['c'] = 3\")")
    said = run_in_kernel("import time\ntime.sleep(5)\nprint(sorted(d.items()))")
    assert "[('a', 1), ('c', 3)]" in said and "d: the changes task 'bg2'" in said


def test_a_background_cells_change_to_a_value_the_notebook_left_alone_comes_back(
    run_in_kernel: Callable[[str], str],
) -> None:
    """Only a change the notebook made meanwhile stops the cell's from being written."""
    run_in_kernel("lst = [1]\nalias = lst\nother = [0]")
    run_in_kernel(_BACKGROUND)
    assert "waiting" not in run_in_kernel("other.append(1)")
    said = run_in_kernel("import time\ntime.sleep(5)\nprint(lst, alias is lst, other)")
    assert "[1, 2] True [0, 1]" in said and "not applied" not in said
