"""Changes a cell makes through a callback come back, as locally.

A bound method kept in a variable (``append_to = lst.append``), a ``functools.partial``
of one, a closure with state of its own (a ``nonlocal`` counter, a list) and a closure over
a notebook dict change the notebook's objects when called locally. A ``%%task`` cell
calling them changes the same objects: the objects they reach travel as names of their
own, and a closure's cells come back into the notebook function's. A real IPython shell
against the real Redis and worker processes.
"""

from __future__ import annotations

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session

CALLBACKS = """\
import functools
lst, l2 = [], []
append_to = lst.append
part = functools.partial(l2.insert, 0)
def make_acc():
    acc = []
    def add(x):
        acc.append(x)
        return len(acc)
    return add
add = make_acc()
class Counter:
    def __init__(self): self.n = 0
    def inc(self): self.n += 1
counter = Counter()
inc = counter.inc
data = {'k': []}
def make(store):
    def put(v):
        store['k'].append(v)
    return put
put = make(data)
def make_counter():
    c = 0
    def tick():
        nonlocal c
        c += 1
        return c
    return tick
tick = make_counter()
"""


def test_changes_made_through_bound_methods_partials_and_closures_come_back(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, CALLBACKS)
    task(ip, "append_to(5)\npart(-1)\nadd(1); add(2)\ninc(); inc()\nput(1)\ntick(); tick(); tick()")
    seen = run(ip, "lst, l2, add(3), counter.n, data, tick()")
    assert seen == ([5], [-1], 3, 2, {"k": [1]}, 4)
    assert ip.user_ns["put"].__closure__[0].cell_contents is ip.user_ns["data"]
    assert ip.user_ns["inc"].__self__ is ip.user_ns["counter"]
    assert capsys.readouterr().err == ""


def test_a_callback_held_in_a_container_says_its_changes_were_not_applied(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "data = {'k': []}\nhandlers = {'add': data['k'].append}\nadd = handlers['add']")
    task(ip, "handlers['add'](2)")
    assert ip.user_ns["data"] == {"k": []}  # replaced, not written into: the cell may rebind it
    assert capsys.readouterr().err.splitlines() == [
        "nbtask: handlers: the changes the cell made through handlers['add'] were not applied: "
        "a callback held in a container comes back calling a copy of what it called, and later "
        "calls change the copy. Call it through a name of its own (add = handlers['add'], "
        "before the cell)"
    ]
    task(ip, "add(3)")  # as the line says
    assert (
        ip.user_ns["data"] == {"k": [3]} and ip.user_ns["add"].__self__ is ip.user_ns["data"]["k"]
    )
