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

from nbtask.errors import SerializationError
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


def test_values_a_cell_bound_that_do_not_load_in_the_kernel_say_what_failed(
    ip: InteractiveShell, nb: Session
) -> None:
    """The class is the notebook's own, and its ``__setstate__`` raises in the kernel."""
    run(
        ip,
        "class Picky:\n    def __reduce__(self):\n        return (Picky, (), {'version': 2})\n"
        "    def __setstate__(self, state):\n"
        "        raise ValueError(f\"version {state['version']} is not known here\")\n",
    )
    with pytest.raises(SerializationError) as info:
        task(ip, "count = 1\npicky = Picky()")
    said = str(info.value)
    assert said.startswith("the values cell ")
    assert "(ValueError: version 2 is not known here)" in said
    assert "rebuilding the value from its state failed" in said
    assert "install" not in said  # what defines it is here
    assert said.endswith("none of them was bound")
    assert info.value._render_traceback_() == [f"SerializationError: {said}"]  # type: ignore[attr-defined]
    assert "count" not in ip.user_ns and "picky" not in ip.user_ns
