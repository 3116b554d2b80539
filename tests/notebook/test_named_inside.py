"""An object the notebook names, reached by a cell inside another value, changes as itself.

Locally ``d["a"].append(3)`` changes the one list that ``l`` names too, and
``pipe.fit(X, y)`` fits the very ``scaler`` and ``lr`` the notebook holds. A ``%%task``
cell that reads only ``d`` (or ``pipe``) does the same: after it, ``l is d["a"]`` and
``pipe.steps[0][1] is scaler`` hold, with the changes visible under every name. A real
IPython shell against the real Redis and worker processes, with ``keep_threshold`` lowered
to 1 MiB so that a 1.2 MB array would be kept.
"""

from __future__ import annotations

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import held_values
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.session import Session

#: A pipeline of steps in plain Python, as scikit-learn's: steps held in (name, step) tuples.
MAKE_CHAIN = """\
class Step:
    def __init__(self):
        self.fitted = False

class Chain:
    def __init__(self, *steps):
        self.steps = [(f"s{i}", step) for i, step in enumerate(steps)]

    def fit(self):
        for position, (name, step) in enumerate(self.steps):
            step.fitted = True
            self.steps[position] = (name, step)  # a new tuple, the same step (as sklearn)
        return self

scaler, lr = Step(), Step()
pipe = Chain(scaler, lr)
"""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024)


def held_on_workers(nb: Session) -> list[str]:
    """The names of the kept values the worker processes announce they hold."""
    return [held.name for held in held_values(nb.app)]


def test_a_named_list_a_cell_changes_inside_a_dict_is_changed_under_its_name(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, 'd = {"a": [1, 2]}\nl = d["a"]')
    task(ip, 'd["a"].append(3)')
    assert run(ip, 'l is d["a"], l') == (True, [1, 2, 3])


def test_a_named_object_a_cell_changes_through_another_objects_attribute_is_that_object(
    ip: InteractiveShell, nb: Session
) -> None:
    """Held in (name, step) tuples of a list attribute, the steps stay the notebook's."""
    run(ip, MAKE_CHAIN)
    task(ip, "pipe.fit()")
    seen = run(ip, "pipe.steps[0][1] is scaler, pipe.steps[1][1] is lr, scaler.fitted, lr.fitted")
    assert seen == (True, True, True, True), "steps[0] is scaler, steps[1] is lr, fitted"


def test_a_named_object_held_in_another_objects_attribute_is_changed_in_place(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "class Box:\n    def __init__(self, items):\n        self.items = items")
    run(ip, "items = [1]\nbox = Box(items)")
    task(ip, "box.items.append(2)")
    assert run(ip, "box.items is items, items") == (True, [1, 2])


def test_a_scikit_learn_pipeline_fitted_in_a_cell_fits_the_notebooks_own_steps(
    ip: InteractiveShell, nb: Session
) -> None:
    pytest.importorskip("sklearn")
    run(
        ip,
        "from sklearn.linear_model import LogisticRegression\n"
        "from sklearn.pipeline import make_pipeline\n"
        "from sklearn.preprocessing import StandardScaler\n"
        "X, y = [[0.0, 1.0], [1.0, 0.0], [2.0, 1.0], [3.0, 0.0]], [0, 0, 1, 1]\n"
        "scaler, lr = StandardScaler(), LogisticRegression()\n"
        "pipe = make_pipeline(scaler, lr)",
    )
    task(ip, "pipe.fit(X, y)")
    seen = run(
        ip,
        "pipe.steps[0][1] is scaler, pipe.steps[1][1] is lr, "
        "hasattr(scaler, 'mean_'), hasattr(lr, 'coef_')",
    )
    assert seen == (True, True, True, True), "steps[0] is scaler, steps[1] is lr, both fitted"


def test_a_named_large_array_a_cell_changes_inside_a_dict_is_changed_and_not_kept(
    ip: InteractiveShell, nb: Session
) -> None:
    """The notebook holds it already: written into its own array, nothing kept."""
    run(ip, 'import numpy as np\nX = np.arange(150_000.0)\ndata = {"X": X}')  # 1.2 MB
    task(ip, 'data["X"][0] = -1.0')
    assert run(ip, 'data["X"] is X, float(X[0])') == (True, -1.0)
    assert held_on_workers(nb) == [], "the notebook's array was kept on the workers"


def test_a_background_cells_change_to_a_named_object_inside_a_value_reaches_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """A later cell reading the inner object's own name waits for the cell, as for ``d``."""
    run(ip, 'd = {"a": [1, 2]}\nl = d["a"]')
    task(ip, 'import time\ntime.sleep(0.5)\nd["a"].append(3)', "")
    assert run(ip, "list(l)") == [1, 2, 3]
    assert run(ip, 'l is d["a"]') is True


def test_the_look_for_named_objects_inside_values_is_bounded_and_skips_what_cannot_change() -> None:
    """A few levels down, only what can change in place, never the shell's own names."""
    from nbtask.notebook.reach import named_inside

    deep: list[object] = []
    near, shells, history = [1], [2], [3]
    values = {"d": {"a": [[deep]], "b": (near,), "c": [shells, history, 1, len]}}
    namespace = {
        "near": near,
        "deep": deep,
        "alias": values["d"],  # the value itself: shipped already
        "n": 1,
        "f": len,
        "Out": shells,  # the shell's own
        "_3": history,  # IPython's history
        **values,
    }
    assert named_inside(values, namespace, hidden={"Out"}) == {"near": near, "deep": deep}
    buried: list[object] = []
    holder: list[object] = [buried]
    for _ in range(4):  # buried five levels down: not looked for
        holder = [holder]
    assert named_inside({"h": holder}, {"h": holder, "buried": buried}) == {}


class _Unreadable(dict[str, object]):
    """A namespace that fails if it is looked through."""

    def items(self):  # type: ignore[override]
        raise AssertionError("the namespace was looked through")


def test_values_holding_nothing_leave_the_namespace_unread() -> None:
    """A cell reading only plain values costs no look through the notebook's namespace.

    The namespace grows with every cell (IPython's ``_i<n>`` history names), so a look
    through it for every cell would cost more with every cell run.
    """
    from nbtask.notebook.reach import named_inside

    namespace = _Unreadable(x=1, s="text", l=[1, 2])
    assert named_inside({"x": 1, "s": "text", "e": []}, namespace) == {}
