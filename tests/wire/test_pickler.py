"""nbtask's pickler carries ``functools`` caches of the notebook by value.

Defined in a namespace named ``__main__`` (as a notebook's are), which no other process
can import: loading them here would fail too if they were pickled by name.
"""

from __future__ import annotations

import fnmatch
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from helpers import NOTEBOOK_CACHES, notebook_namespace

from nbtask.wire.envelope import dumps

CELL = (
    NOTEBOOK_CACHES
    + """
@functools.cache
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
"""
)


def round_trip(value: Any) -> Any:
    return cloudpickle.loads(dumps(value))


def test_a_cached_function_of_the_notebook_travels_with_its_settings_and_no_cache() -> None:
    cells = notebook_namespace(CELL)
    kind = cells["kind"]
    kind(1)
    kind.note = "kept"
    copy = round_trip(kind)
    assert copy is not kind and copy(1.0) == "float" and copy(1) == "int"
    assert copy.cache_parameters() == {"maxsize": 3, "typed": True}
    assert copy.cache_info() == (0, 2, 3, 2)  # its own cache, started empty
    assert (copy.__name__, copy.__qualname__, copy.__module__) == ("kind", "kind", "__main__")
    assert copy.note == "kept"


def test_a_recursive_cached_function_calls_its_own_copy() -> None:
    fib = round_trip(notebook_namespace(CELL)["fib"])
    assert fib(60) == 1548008755920
    assert fib.__wrapped__.__globals__["fib"] is fib
    assert fib.cache_parameters() == {"maxsize": None, "typed": False}
    assert fib.cache_info().currsize == 61


def test_classes_with_cached_properties_and_cached_methods_travel() -> None:
    """Loaded in another process, where the class is rebuilt from its pickle."""
    cells = notebook_namespace(CELL)
    model = cells["Model"](4)
    assert model.double == 8
    copy = round_trip(model)  # here the class comes back as itself (cloudpickle tracks it)
    assert type(copy) is cells["Model"] and vars(copy) == {"v": 4, "double": 8}
    elsewhere = (
        "import sys, cloudpickle\n"
        "Model, model = cloudpickle.loads(sys.stdin.buffer.read())\n"
        "print(vars(model), Model(5).double, Model(5).plus(2), type(model) is Model,\n"
        "      Model.__dict__['double'].attrname, Model.__dict__['plus'].cache_parameters())\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", elsewhere],
        input=dumps((cells["Model"], model)),
        capture_output=True,
        timeout=60,
        check=True,
    )
    said = "{'v': 4, 'double': 8} 10 7 True double {'maxsize': 4, 'typed': False}"
    assert shown.stdout.decode().strip() == said


def test_a_cached_property_made_by_hand_keeps_its_name() -> None:
    prop = functools.cached_property(lambda self: 3)
    prop.__set_name__(object, "three")
    copy = round_trip(prop)
    assert copy.attrname == "three" and copy.func(None) == 3


def test_installed_cached_functions_still_travel_by_name() -> None:
    assert round_trip(fnmatch._compile_pattern) is fnmatch._compile_pattern  # type: ignore[attr-defined]


def test_a_cache_made_over_a_builtin_travels_by_value() -> None:
    """Found under its name (``builtins.len``), the object there is not the cache."""
    counted = functools.lru_cache(maxsize=2)(len)
    copy = round_trip(counted)
    assert copy is not counted and copy.__wrapped__ is len and copy("abc") == 3


def test_cached_functions_of_a_module_shipped_by_value_travel_by_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shipped_cache_module.py").write_text(
        "import functools\n@functools.lru_cache(maxsize=2)\ndef half(n):\n    return n / 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import shipped_cache_module  # type: ignore[import-not-found]

    cloudpickle.register_pickle_by_value(shipped_cache_module)
    try:
        copy = round_trip(shipped_cache_module.half)
    finally:
        cloudpickle.unregister_pickle_by_value(shipped_cache_module)
        del sys.modules["shipped_cache_module"]
    assert copy is not shipped_cache_module.half and copy(3) == 1.5
    assert copy.cache_parameters() == {"maxsize": 2, "typed": False}
