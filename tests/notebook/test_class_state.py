"""A cell's changes to the notebook's classes and functions' defaults come back.

Locally ``Counter.count += 1`` changes the notebook's class, and ``remember(1)`` the list
its default ``seen=[]`` holds. Classes and functions defined in the notebook travel by
value: the worker changes its copy, and what it changed comes back into the notebook's
own class or function, as locally. A real IPython shell, and a real kernel, against real
worker processes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session

_COUNTER = "class Counter:\n    count = 0\n    registry = []\n"
_REMEMBER = "def remember(v, seen=[]):\n    seen.append(v)\n    return len(seen)\n"


def test_a_class_attribute_a_cell_rebinds_comes_back_to_the_notebooks_class(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, _COUNTER + "original = Counter")
    task(ip, "Counter.count += 1")
    assert run(ip, "Counter.count") == 1
    assert run(ip, "Counter is original")
    task(ip, "Counter.count += 1\nCounter.label = 'c'\ndel Counter.registry")
    assert run(ip, "(Counter.count, Counter.label, hasattr(Counter, 'registry'))") == (
        2,
        "c",
        False,
    )
    assert capsys.readouterr().err == ""


def test_a_class_attribute_a_cell_changes_in_place_is_the_notebooks_object(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, _COUNTER + "seen = Counter.registry")
    task(ip, "Counter.registry.append('x')")
    assert run(ip, "Counter.registry") == ["x"]
    assert run(ip, "Counter.registry is seen")
    assert capsys.readouterr().err == ""


def test_a_class_a_cell_changes_through_a_function_it_calls_is_changed(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, _COUNTER + "def bump():\n    Counter.count += 1\n    Counter.registry.append(1)\n")
    task(ip, "bump()\nbump()")
    assert run(ip, "(Counter.count, Counter.registry)") == (2, [1, 1])


def test_a_class_a_cell_changes_through_an_instance_or_a_subclass_is_changed(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(
        ip,
        "class Base:\n    made = []\n"
        "class Item(Base):\n    count = 0\n"
        "    def bump(self):\n        type(self).count += 1\n        self.made.append(1)\n"
        "item = Item()",
    )
    task(ip, "item.bump()")
    assert run(ip, "(Item.count, Base.made, 'count' in vars(Base))") == (1, [1], False)
    task(ip, "Item.bump(item)\nItem.made = ['own']")
    assert run(ip, "(Item.count, Base.made, Item.made)") == (2, [1, 1], ["own"])
    assert capsys.readouterr().err == ""


def test_a_functions_mutable_default_a_cell_changes_comes_back(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, _REMEMBER + "default = remember.__defaults__[0]")
    task(ip, "n = remember(1)")
    assert run(ip, "(n, remember(2))") == (1, 2)
    assert run(ip, "remember.__defaults__[0] is default")
    run(ip, "def via(v):\n    return remember(v)\n")
    task(ip, "m = via(3)")
    assert run(ip, "(m, default)") == (3, [1, 2, 3])
    assert capsys.readouterr().err == ""


def test_a_keyword_only_default_a_cell_changes_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "def tally(v, *, counts={}):\n    counts[v] = counts.get(v, 0) + 1\n")
    task(ip, "tally('a')\ntally('a')")
    assert run(ip, "tally.__kwdefaults__['counts']") == {"a": 2}


def test_a_class_attribute_that_cannot_come_back_is_said_in_one_line(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, _COUNTER)
    task(ip, "import threading\nCounter.lock = threading.Lock()\nCounter.count = 5")
    assert run(ip, "(Counter.count, hasattr(Counter, 'lock'))") == (5, False)
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1, said
    assert said[0].startswith("nbtask: Counter.lock: the cell's change to it did not come back")


def test_in_a_kernel_a_cells_changes_to_a_class_and_a_default_come_back(
    run_in_kernel: Callable[[str], str],
) -> None:
    run_in_kernel(_COUNTER + _REMEMBER)
    assert run_in_kernel("%%task -w\nCounter.count += 1") == ""
    assert run_in_kernel("%%task -w\nCounter.registry.append('x')") == ""
    assert run_in_kernel("%%task -w\nn = remember(1)") == ""
    said = run_in_kernel("print(Counter.count, Counter.registry, (n, remember(2)))")
    assert said == "1 ['x'] (1, 2)\n"


def test_a_background_cells_class_change_the_notebook_overtook_is_said_not_applied(
    run_in_kernel: Callable[[str], str],
) -> None:
    run_in_kernel(_COUNTER)
    run_in_kernel("%%task bg\nimport time\ntime.sleep(3)\nCounter.count += 1")
    assert "waiting" not in run_in_kernel("exec('Counter.count = 10')")  # no guard sees it
    said = run_in_kernel("import time\ntime.sleep(5)\nprint(Counter.count)")
    said += run_in_kernel("print(Counter.count)")
    assert said.endswith("10\n10\n")
    lines = [line for line in said.splitlines() if "not applied" in line]
    assert len(lines) == 1, said
    assert lines[0].startswith("nbtask: the cell's changes to class Counter (count) were not")
    assert "--wait" in lines[0]

    run_in_kernel("%%task bg2\nimport time\ntime.sleep(1)\nCounter.registry.append(1)")
    said = run_in_kernel("import time\ntime.sleep(4)\nprint(Counter.registry)")
    said += run_in_kernel("print(Counter.registry, Counter.count)")
    assert said.endswith("[1] 10\n") and "not applied" not in said
