"""Tasks of the notebook that use ``functools`` caches run on the workers as they do here.

A ``functools.lru_cache`` function or a class with ``functools.cached_property`` defined
in the notebook travels by value to the worker and back (what it cached does not). The
tasks are defined as a notebook defines them: code run in a namespace of its own named
``__main__``, which workers cannot import.
"""

from __future__ import annotations

import pytest
from helpers import NOTEBOOK_CACHES, notebook_namespace

import nbtask
from nbtask import App
from nbtask.core.task_errors import unloadable, unloadable_values

CACHED = (
    NOTEBOOK_CACHES
    + """
@functools.lru_cache(maxsize=None)
def cube(n):
    return n ** 3

@app.task
def cubes(n):
    return cube(n) + cube(n), cube.cache_info(), (kind(1), kind(1.0))

@app.task
def read(model):
    return model.double, model.plus(1), Model(model.v + 1).double, model

@app.task
def give_back(f):
    return f
"""
)


def test_a_task_calls_a_cached_function_of_the_notebook(app: App, start_worker) -> None:
    start_worker()
    cells = notebook_namespace(CACHED, app=app)
    total, info, kinds = cells["cubes"].delay(3).get(timeout=10)
    # The worker's copy starts empty, with the notebook's settings: one miss, one hit.
    assert (total, tuple(info), kinds) == (54, (1, 1, None, 1), ("int", "float"))
    back = cells["give_back"].delay(cells["kind"]).get(timeout=10)
    assert back(2) == "int" and back.cache_parameters() == {"maxsize": 3, "typed": True}


def test_objects_with_cached_properties_and_methods_travel_both_ways(
    app: App, start_worker
) -> None:
    start_worker()
    cells = notebook_namespace(CACHED, app=app)
    model = cells["Model"](4)
    assert model.double == 8  # cached here: the value travels in the object
    double, plus, other, back = cells["read"].delay(model).get(timeout=10)
    assert (double, plus, other) == (8, 5, 10)
    assert type(back) is cells["Model"] and vars(back) == {"v": 4, "double": 8}


def test_an_exception_keeps_an_attribute_with_a_cached_property(app: App, start_worker) -> None:
    """Its lock is left out; the object with a ``cached_property`` travels."""
    start_worker()
    cells = notebook_namespace(
        CACHED + "import threading\n"
        "class FitFailed(Exception):\n"
        "    def __init__(self, model):\n"
        "        super().__init__('fit failed')\n"
        "        self.model, self.lock = model, threading.Lock()\n"
        "@app.task\ndef fit(v):\n    raise FitFailed(Model(v))\n",
        app=app,
    )
    with pytest.raises(cells["FitFailed"], match="fit failed") as info:
        cells["fit"].delay(3).get(timeout=10)
    assert info.value.model.double == 6 and not hasattr(info.value, "lock")


def test_a_notebook_object_pickled_by_name_says_what_it_is(app: App, start_worker) -> None:
    """The result names an object of the worker's ``__main__``: nothing to install here."""
    start_worker()
    cells = notebook_namespace(
        "import sys\n"
        "class Registry:\n    def __reduce__(self):\n        return 'ONLY_ON_THE_WORKER'\n"
        "@app.task\ndef registry():\n"
        "    sys.modules['__main__'].ONLY_ON_THE_WORKER = made = Registry()\n"
        "    return made\n",
        app=app,
    )
    with pytest.raises(nbtask.SerializationError) as info:
        cells["registry"].delay().get(timeout=10)
    said = str(info.value)
    assert "'ONLY_ON_THE_WORKER' is defined in the notebook or a cell" in said
    assert "could not be pickled by value" in said
    assert "install" not in said


def test_the_advice_for_a_missing_name_says_install_only_outside_the_notebook() -> None:
    notebook_name = "AttributeError: Can't get attribute 'sq' on <module '__main__'>"
    installed = "AttributeError: Can't get attribute 'Frame' on <module 'pandas' from '/x.py'>"
    for said in (
        str(unloadable_values("import functools", notebook_name, missing=True)),
        str(unloadable("sq[1]", notebook_name, missing=True)),
    ):
        assert "'sq' is defined in the notebook or a cell" in said and "install" not in said
    for said in (
        str(unloadable_values("import pandas", installed, missing=True)),
        str(unloadable("frame[1]", installed, missing=True)),
    ):
        assert "install what defines it here" in said and "notebook" not in said
