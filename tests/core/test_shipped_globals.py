"""Tasks shipped by value read the globals, closures and helpers they use as they are
when each call is sent, as a local call would; the pickle is reused while nothing changed.

The tasks are defined as a notebook defines them: code run in a namespace of its own
named ``__main__``, which workers cannot import.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import cloudpickle
import pytest

from nbtask import App
from nbtask.core.outgoing import code_for
from nbtask.core.task import Task
from tests import sample_tasks


def notebook(app: App, source: str) -> dict[str, Any]:
    """The namespace of a notebook that ran ``source`` (with ``app`` defined)."""
    namespace: dict[str, Any] = {"__name__": "__main__", "app": app}
    run_cell(namespace, source)
    return namespace


def run_cell(namespace: dict[str, Any], source: str) -> None:
    exec(compile(source, "<notebook cell>", "exec"), namespace)


COUNT_ABOVE = """
threshold = 0.5

@app.task
def count_above(xs):
    return sum(x > threshold for x in xs)
"""


def test_a_rebound_global_reaches_the_workers(app: App, start_worker) -> None:
    start_worker()
    cells = notebook(app, COUNT_ABOVE)
    count_above = cells["count_above"]
    assert count_above.delay([0.1, 0.6, 0.9]).get(timeout=10) == 2
    run_cell(cells, "threshold = 0.05")
    assert count_above([0.1, 0.6, 0.9]) == 3
    assert count_above.delay([0.1, 0.6, 0.9]).get(timeout=10) == 3


def test_a_helper_defined_after_a_send_is_found(app: App, start_worker) -> None:
    start_worker()
    cells = notebook(app, "@app.task\ndef uses_helper(v):\n    return helper(v)\n")
    uses_helper = cells["uses_helper"]
    with pytest.raises(NameError, match="helper"):
        uses_helper.delay(1).get(timeout=10)
    run_cell(cells, "offset = 1\ndef helper(v):\n    return v + offset\n")
    assert uses_helper.delay(1).get(timeout=10) == 2
    # What the helper reads counts too, as does a helper redefined.
    run_cell(cells, "offset = 10")
    assert uses_helper.delay(1).get(timeout=10) == 11
    run_cell(cells, "def helper(v):\n    return -v\n")
    assert uses_helper.delay(1).get(timeout=10) == -1


def test_a_global_list_changed_in_place_is_seen(app: App, start_worker) -> None:
    start_worker()
    cells = notebook(app, "weights = [1, 2]\n@app.task\ndef total():\n    return sum(weights)\n")
    total = cells["total"]
    assert total.delay().get(timeout=10) == 3
    run_cell(cells, "weights.append(10)")
    assert total.delay().get(timeout=10) == 13


def test_a_closure_and_defaults_are_read_at_each_send(app: App, start_worker) -> None:
    start_worker()
    factor = 2

    @app.task
    def scale(x: int, plus: int = 0) -> int:
        return x * factor + plus

    assert scale.delay(3).get(timeout=10) == 6
    factor = 10
    assert scale.delay(3).get(timeout=10) == 30
    scale.run.__defaults__ = (1,)
    assert scale.delay(3).get(timeout=10) == 31


SLOTS_CLASSES = """
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")

class Frozen:
    __slots__ = ("v",)
    def __init__(self, v):
        self.v = v

@dataclass(slots=True)
class Point:
    x: int

class Tagged(Frozen):
    __slots__ = ("tag", "__weakref__")

class Pair(NamedTuple):  # its metaclass makes the slots, and refuses them in the class body
    a: int
    b: int = 2

class Box(Generic[T]):
    __slots__ = ("item",)
    def __init__(self, item):
        self.item = item

@app.task
def make(v):
    return Frozen(v), Point(v), Tagged(v), Pair(v), Box(v)

@app.task
def bump(f):
    f.v += 1
    return f
"""


def test_objects_of_a_notebook_slots_class_come_back_from_a_task(app: App, start_worker) -> None:
    """A ``__slots__`` class (a dataclass with ``slots=True`` too) travels by value."""
    start_worker()
    cells = notebook(app, SLOTS_CLASSES)
    frozen, point, tagged, pair, box = cells["make"].delay(3).get(timeout=10)
    assert type(frozen) is cells["Frozen"] and frozen.v == 3
    assert point == cells["Point"](3)
    assert type(tagged) is cells["Tagged"] and tagged.v == 3 and not hasattr(tagged, "tag")
    assert type(pair) is cells["Pair"] and pair == (3, 2)
    assert type(box) is cells["Box"] and box.item == 3
    assert not any(hasattr(o, "__dict__") for o in (frozen, point, tagged, pair, box))
    bumped = cells["bump"].delay(cells["Frozen"](5)).get(timeout=10)
    assert type(bumped) is cells["Frozen"] and bumped.v == 6


def test_the_pickle_is_reused_while_nothing_it_holds_changed(app: App) -> None:
    cells = notebook(app, COUNT_ABOVE + "def unused():\n    pass\n")
    count_above: Task = cells["count_above"]
    cache: weakref.WeakKeyDictionary[Task, Any] = weakref.WeakKeyDictionary()
    first = code_for(count_above, cache)
    entry = cache[count_above]
    assert entry.captured is not None
    # Sent again, and after a change to a name the task does not read: the same pickle.
    assert code_for(count_above, cache) == first
    run_cell(cells, "unused = 1\nother = [1]")
    assert code_for(count_above, cache) == first
    assert cache[count_above] is entry
    # A global it reads, rebound (even to an equal value): pickled again.
    run_cell(cells, "threshold = 0.05")
    second = code_for(count_above, cache)
    assert second[0] != first[0] and cache[count_above] is not entry
    run_cell(cells, "threshold = float('0.05')")
    assert code_for(count_above, cache) == second and cache[count_above] is not entry
    # An option set on the task's class is part of its pickle too.
    entry = cache[count_above]
    type.__setattr__(type(count_above), "custom_option", 1)
    assert code_for(count_above, cache)[0] != second[0]
    assert cache[count_above] is not entry


def test_a_task_reading_a_mutable_global_is_pickled_at_every_send(app: App) -> None:
    cells = notebook(app, "weights = [1]\n@app.task\ndef total():\n    return sum(weights)\n")
    total: Task = cells["total"]
    cache: weakref.WeakKeyDictionary[Task, Any] = weakref.WeakKeyDictionary()
    first = code_for(total, cache)
    assert cache[total].captured is None
    run_cell(cells, "weights.append(2)")
    assert code_for(total, cache)[0] != first[0]


def test_a_cached_task_reading_itself_is_not_kept_alive(app: App) -> None:
    cells = notebook(app, "@app.task\ndef again(n):\n    return again.delay(n - 1) if n else 0\n")
    again: Task = cells["again"]
    cache: weakref.WeakKeyDictionary[Task, Any] = weakref.WeakKeyDictionary()
    code_for(again, cache)
    assert cache[again].captured is not None
    # The notebook redefines it: nothing else holds the old task.
    gone = weakref.ref(again)
    del cells["again"], app.tasks[again.name], again
    gc.collect()
    assert gone() is None and not cache


def test_a_module_registered_to_travel_by_value_renews_the_pickle(app: App) -> None:
    cells = notebook(app, COUNT_ABOVE)
    count_above: Task = cells["count_above"]
    cache: weakref.WeakKeyDictionary[Task, Any] = weakref.WeakKeyDictionary()
    code_for(count_above, cache)
    entry = cache[count_above]
    # What the notebook does for a module written next to it: what travels by name changes.
    cloudpickle.register_pickle_by_value(sample_tasks)
    try:
        code_for(count_above, cache)
        assert cache[count_above] is not entry
    finally:
        cloudpickle.unregister_pickle_by_value(sample_tasks)
