"""A name a cell binds to a notebook object it was sent is that very object, as locally.

``alias = small`` in a ``%%task`` cell leaves ``alias is small`` in the notebook: a later
``small.append(1)`` shows in ``alias``. The object is not sent back (however large: nothing
is kept on the workers for it), and one the cell changed in place is written into the
notebook's object. A real IPython shell against the real Redis and worker processes, with
``keep_threshold`` lowered to 1 MiB so that a 1.2 MB array would be kept.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import held_values, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session

MAKE_BIG = "import numpy as np\nbig = np.arange(150_000.0)"  # 1.2 MB


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024)


def held_on_workers(nb: Session) -> list[str]:
    """The names of the kept values the worker processes announce they hold."""
    return [held.name for held in held_values(nb.app)]


@pytest.mark.parametrize(
    "make",
    [
        "small = [1, 2]",
        "small = {'a': 1}",
        "import pandas as pd\nsmall = pd.DataFrame({'a': [1, 2]})",
    ],
    ids=["list", "dict", "frame"],
)
def test_a_name_bound_to_a_shipped_object_is_that_object(
    ip: InteractiveShell, nb: Session, make: str
) -> None:
    run(ip, make)
    task(ip, "alias = small")
    assert run(ip, "alias is small") is True, "the cell's alias came back as a copy"


def test_a_name_bound_to_a_shipped_list_sees_the_notebooks_later_changes(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "small = [1, 2]")
    task(ip, "alias = small\nsmall.append(3)")  # changed in the cell too: written in place
    run(ip, "small.append(4)")
    assert run(ip, "alias is small, alias") == (True, [1, 2, 3, 4])


def test_a_name_bound_to_a_large_shipped_array_is_that_array_and_nothing_is_kept(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, MAKE_BIG)
    task(ip, "alias = big")
    assert run(ip, "alias is big") is True, f"alias is {type(ip.user_ns['alias']).__name__}"
    assert held_on_workers(nb) == [], "a copy of the notebook's array was kept on the workers"


@pytest.mark.parametrize(
    ("change", "after"),
    [("big[0] = -1.0", (-1.0, 1.0)), ("big += 1.0", (1.0, 2.0))],
    ids=["item", "augmented"],
)
def test_a_large_shipped_array_the_cell_changes_in_place_changes_under_every_name(
    ip: InteractiveShell, nb: Session, change: str, after: tuple[float, float]
) -> None:
    """Locally every name and container holding the array sees the change: here too.

    It is not kept on the workers (the notebook holds it already): its new state is
    written into the notebook's own array.
    """
    run(ip, MAKE_BIG + "\nother = big\nbox = [big]")
    task(ip, f"alias = big\n{change}")
    seen = run(ip, "type(big).__name__, big is other, box[0] is big, alias is big")
    assert seen == ("ndarray", True, True, True), f"big, other, box[0], alias: {seen}"
    assert run(ip, "float(other[0]), float(box[0][1])") == after
    assert held_on_workers(nb) == [], "the notebook's array was kept on the workers"


def test_a_large_shipped_array_kept_on_the_workers_once_changed_is_so_under_every_name(
    ip: InteractiveShell, nb: Session
) -> None:
    """``--keep`` it: the notebook's other names for it stand for the kept value too."""
    run(ip, MAKE_BIG + "\nother = big")
    task(ip, "big[0] = -1.0", "--wait --keep big")
    assert held_on_workers(nb) == ["big"]
    assert isinstance(ip.user_ns["other"], RemoteValue), "other still holds the old array"
    assert run(ip, "other is big, float(other[0])") == (True, -1.0)


def test_a_shipped_value_that_grew_large_in_place_is_kept_under_every_name(
    ip: InteractiveShell, nb: Session
) -> None:
    """It grew by as much as a kept value: kept, and its other names stand for it too."""
    run(ip, "store = {}\nother = store")
    task(ip, "import numpy as np\nstore['x'] = np.arange(300_000.0)")
    assert held_on_workers(nb) == ["store"]
    assert isinstance(ip.user_ns["other"], RemoteValue), "other still holds the old dict"
    assert run(ip, "other is store, float(other['x'][-1])") == (True, 299_999.0)


@pytest.mark.parametrize(
    ("make", "hold", "read"),
    [
        ("small = [1, 2]", "pair = (small, 1)", "pair[0]"),
        ("small = [1, 2]", "d = {'k': small}", "d['k']"),
        ("small = [1, 2]", "nested = [[0, small]]", "nested[0][1]"),
        ("small = ('a', 'b')", "seen = {small}", "next(iter(seen))"),
        ("small = {'a': 1}", "import types\nbox = types.SimpleNamespace(item=small)", "box.item"),
        ("class Box:\n    pass\nsmall = Box()", "boxes = [small, small]", "boxes[1]"),
    ],
    ids=["tuple", "dict", "nested-list", "set", "attribute", "object"],
)
def test_a_notebook_object_held_inside_a_value_the_cell_sends_back_is_that_object(
    ip: InteractiveShell, nb: Session, make: str, hold: str, read: str
) -> None:
    run(ip, make)
    task(ip, hold)
    assert run(ip, f"{read} is small") is True, "the object came back inside as a copy"


def test_a_cells_last_expression_holding_a_notebook_object_holds_that_object(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "small = [1, 2]")
    shown = task(ip, "(small, 1)")
    assert shown[0] is ip.user_ns["small"], "Out's small is a copy"


def test_a_notebook_object_the_cell_changed_comes_back_changed_inside_its_values(
    ip: InteractiveShell, nb: Session
) -> None:
    """Changed in place, it is not named: its new state comes back, written into it."""
    run(ip, "small = [1, 2]")
    task(ip, "small.append(3)\nd = {'k': small}")
    assert run(ip, "d['k'] is small, small") == (True, [1, 2, 3])


def test_a_notebook_object_the_cell_changed_comes_back_changed_inside_its_tuples(
    ip: InteractiveShell, nb: Session
) -> None:
    """A tuple cannot be changed: the new one holds the notebook's object, as locally."""
    run(ip, "small = [1, 2]")
    task(ip, "small.append(3)\npair = (small, 1)\nsteps = [('s', small)]")
    assert run(ip, "pair[0] is small, steps[0][1] is small, small") == (True, True, [1, 2, 3])


def test_a_background_cells_value_holds_the_object_it_was_sent_though_the_name_went(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "small = [1, 2]")
    sent = ip.user_ns["small"]
    task(ip, "import time\ntime.sleep(1)\npair = (small, 1)", "--out h")
    run(ip, "del small")  # meanwhile: as locally, pair still holds the object
    ip.user_ns["h"].result(timeout=30)
    assert run(ip, "pair")[0] is sent


@pytest.mark.parametrize(
    "make",
    ["class Box:\n    pass\nsmall = Box()", MAKE_BIG.replace("big", "small")],
    ids=["object", "large-array"],
)
def test_a_background_cell_lets_go_of_the_objects_it_was_sent_once_it_ended(
    ip: InteractiveShell, nb: Session, make: str
) -> None:
    """The notebook deleted them while it ran: it holds them no longer than it runs.

    Nothing is run in the notebook after the cell ended (its values are written when a
    cell next runs): the objects it names are held until then, the others go.
    """
    run(ip, make + "\nkept = [3]")
    gone = weakref.ref(ip.user_ns["small"])
    task(ip, "import time\ntime.sleep(1)\nn = 1 if small is not None else 0\nk = kept", "--out h")
    run(ip, "del small")
    held = ip.user_ns["kept"]
    ip.user_ns["h"].result(timeout=30)
    wait_until(lambda: gc.collect() >= 0 and gone() is None, 10, "small to be let go")
    assert run(ip, "n, k is kept") == (1, True)
    assert ip.user_ns["k"] is held


def test_a_name_bound_to_a_shipped_object_the_cell_then_rebinds_is_the_old_object(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "small = [1, 2]\nfirst = small")
    task(ip, "alias = small\nsmall = [9]")
    assert run(ip, "alias is first, small") == (True, [9])


def test_a_background_cells_alias_is_the_object_it_was_sent_though_the_name_was_rebound(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "small = [1, 2]")
    task(ip, "import time\ntime.sleep(1)\nalias = small", "")  # in the background
    run(ip, "first = small\nsmall = [9]")  # meanwhile: as locally, alias is still first
    run(ip, "seen = (alias is first, alias is small)")  # waits for the cell
    assert ip.user_ns["seen"] == (True, False)


@pytest.mark.parametrize("line", ["--wait", "--out h"])
def test_a_failed_cells_alias_is_the_notebooks_object(
    ip: InteractiveShell, nb: Session, line: str
) -> None:
    """Bound before the failing line, as locally: the notebook's object, not a copy."""
    run(ip, "small = [1, 2]\nfirst = small")
    result = ip.run_cell(f"%%task {line}\nsame = small\npair = (small, 1)\n1 / 0")
    if line != "--wait":  # the error is raised where a later cell reads a name it binds
        assert result.error_in_exec is None
        run(ip, "small = [9]")  # meanwhile: as locally, same is still the first list
        result = ip.run_cell("same")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    seen = run(ip, "(same is first, pair[0] is first)")
    assert seen == (True, True), "the failed cell's names came back as copies"


@pytest.mark.parametrize("again", ["%%task --out h2\nsame = 2", "same = 2"])
def test_a_failed_cell_lets_go_of_its_objects_once_its_names_are_bound_anew(
    ip: InteractiveShell, nb: Session, again: str
) -> None:
    """Run again (or bound by the notebook), its names hold them no longer, as locally."""
    run(ip, "class Box:\n    pass\nsmall = Box()")
    gone = weakref.ref(ip.user_ns["small"])
    ip.run_cell("%%task --out h\nsame = small\n1 / 0")
    with pytest.raises(ZeroDivisionError):
        ip.user_ns["h"].result(timeout=30)
    ip.run_cell(again)
    run(ip, "del small")
    wait_until(lambda: gc.collect() >= 0 and gone() is None, 10, "small to be let go")


def test_a_cells_last_expression_naming_such_an_alias_is_the_notebooks_object(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "small = [1, 2]\nfirst = small")
    shown = task(ip, "alias = small\nsmall = small\nalias")  # small bound anew, to itself
    assert shown is ip.user_ns["first"] is ip.user_ns["small"] is ip.user_ns["alias"]
