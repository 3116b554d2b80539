"""Objects of the notebook's own classes come back from a ``%%task`` cell as locally, or
with one line that says what failed.

A class defined in the notebook travels by value; its objects that the cell changed in
place or made come back as objects of the notebook's class. A real IPython shell against
the real Redis and worker processes.
"""

from __future__ import annotations

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session


def test_an_object_of_a_notebook_slots_class_changed_in_place_or_made_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    """A class with ``__slots__``, defined in the notebook (it travels by value), as locally."""
    run(
        ip,
        "from dataclasses import dataclass\n"
        "class Frozen:\n    __slots__ = ('v',)\n    def __init__(self):\n        self.v = 1\n"
        "@dataclass(slots=True)\nclass Point:\n    x: int\n"
        "fz = Frozen()\nheld = [fz]\npoint = Point(1)",
    )
    task(ip, "fz.v = 2\npoint.x = 5")
    assert ip.user_ns["fz"].v == 2
    assert ip.user_ns["held"][0] is ip.user_ns["fz"]
    assert ip.user_ns["point"] == ip.user_ns["Point"](5)
    task(ip, "fz2 = Frozen()\nfz2.v = 7\np2 = Point(3)")
    fz2 = ip.user_ns["fz2"]
    assert isinstance(fz2, ip.user_ns["Frozen"]) and fz2.v == 7
    assert not hasattr(fz2, "__dict__")
    assert ip.user_ns["p2"] == ip.user_ns["Point"](3)


PICKY = (
    "class Picky:\n    def __reduce__(self):\n        return (Picky, (), {'version': 2})\n"
    "    def __setstate__(self, state):\n"
    "        raise ValueError(f\"version {state['version']} is not known here\")\n"
)
# A class in a module only the worker has (made by the cell, there).
WORKER_ONLY = (
    "import sys, types\nmodule = types.ModuleType('only_on_the_worker')\n"
    "exec('class Kept:\\n    pass', module.__dict__)\nsys.modules[module.__name__] = module\n"
)


@pytest.mark.parametrize(
    ("make", "why", "advice"),
    [
        ("b = Picky()", "(ValueError: version 2 is not known here)", "rebuilding the value"),
        (
            f"{WORKER_ONLY}b = module.Kept()\ndel module",
            "(ModuleNotFoundError: No module named 'only_on_the_worker')",
            "install what defines it here",
        ),
    ],
    ids=["setstate-raises", "class-only-on-the-worker"],
)
@pytest.mark.parametrize("line", ["--wait", "--out h"])
def test_a_value_that_does_not_load_in_the_kernel_loses_no_other(
    ip: InteractiveShell,
    nb: Session,
    capsys: pytest.CaptureFixture[str],
    make: str,
    why: str,
    advice: str,
    line: str,
) -> None:
    """The other names come back as locally; the one that cannot is named, with why."""
    run(ip, PICKY + "shared = [1]\nb = 'before'")
    cell = f"a = 1\n{make}\nc = 3\nalias = shared\nd = [shared]\nboth = [b, shared]"
    task(ip, cell, line)
    if line != "--wait":  # in the background: delivered as the next cell starts
        run(ip, "finished = h.result(30)")
        run(ip, "pass")
    said = [line for line in capsys.readouterr().err.splitlines() if "did not come back" in line]
    assert (ip.user_ns["a"], ip.user_ns["c"], ip.user_ns["d"]) == (1, 3, [[1]])
    assert ip.user_ns["alias"] is ip.user_ns["shared"] is ip.user_ns["d"][0]
    # It is not left with its old value, nor is a name whose value holds it.
    assert "b" not in ip.user_ns and "both" not in ip.user_ns
    assert len(said) == 2, said
    about_b = next(text for text in said if text.startswith("nbtask: b "))
    assert why in about_b and advice in about_b, about_b
    assert (
        "nbtask: both did not come back from the worker (it shares an object with b,"
        in "\n".join(said)
    )
