"""Functions and classes of the notebook that use ``functools`` caches travel with ``%%task``.

``functools.lru_cache`` / ``functools.cache`` functions and ``functools.cached_property``
defined in the notebook or in the cell go to the workers and come back by value, with
their cache settings; what they cached does not travel. A real IPython shell against the
real Redis and worker processes, and a real kernel (jupyter_client), whose ``__main__`` is
the notebook's own namespace.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import execute, kernel_env, stream_text
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.session import Session


def test_cached_functions_made_in_the_cell_come_back_with_its_other_values(
    ip: InteractiveShell, nb: Session
) -> None:
    task(
        ip,
        "import functools\n"
        "@functools.lru_cache(maxsize=None)\ndef sq(n):\n    return n * n\n"
        "@functools.cache\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "@functools.lru_cache(maxsize=16, typed=True)\ndef kind(v):\n    return type(v).__name__\n"
        "result = sq(12)\nfibs = fib(40)\nkinds = (kind(1), kind(1.0))",
    )
    ns = ip.user_ns
    assert (ns["result"], ns["fibs"], ns["kinds"]) == (144, 102334155, ("int", "float"))
    assert ns["sq"](5) == 25 and ns["sq"].cache_parameters() == {"maxsize": None, "typed": False}
    assert ns["fib"](50) == 12586269025  # its recursion goes through the cache here too
    assert ns["fib"].__wrapped__.__globals__["fib"] is ns["fib"]
    assert ns["kind"].cache_parameters() == {"maxsize": 16, "typed": True}
    assert ns["kind"].cache_info().currsize == 0  # what the worker cached stays there


def test_a_cached_function_of_the_notebook_is_called_by_a_cell(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "import functools\n@functools.lru_cache\ndef cube(n):\n    return n ** 3\ncube(2)")
    task(ip, "got = cube(3) + cube(3)\ninfo = cube.cache_info()")
    assert ip.user_ns["got"] == 54
    # The worker's copy started empty, with the notebook's settings: one miss, one hit.
    assert ip.user_ns["info"] == (1, 1, 128, 1)
    assert ip.user_ns["cube"].cache_info().currsize == 1  # the notebook's own, untouched


def test_classes_with_cached_properties_and_methods_travel_both_ways(
    ip: InteractiveShell, nb: Session
) -> None:
    run(
        ip,
        "import functools\n"
        "class Model:\n"
        "    def __init__(self, v):\n        self.v = v\n"
        "    @functools.cached_property\n    def double(self):\n        return self.v * 2\n"
        "    @functools.lru_cache(maxsize=4)\n    def plus(self, a):\n        return self.v + a\n"
        "    def __hash__(self):\n        return hash(self.v)\n"
        "model = Model(4)\nmodel.double",
    )
    task(
        ip,
        "seen = (model.double, model.plus(1), Model(5).double)\n"
        "class Made:\n"
        "    @functools.cached_property\n    def label(self):\n        return 'made'\n"
        "made = Made()\nmade.label",
    )
    ns = ip.user_ns
    assert ns["seen"] == (8, 5, 10)
    assert ns["made"].label == "made" and vars(ns["made"]) == {"label": "made"}
    assert type(ns["made"]) is ns["Made"]
    assert ns["Made"]().label == "made"  # the class that came back computes it too
    assert ns["Made"].__dict__["label"].attrname == "label"


def test_a_notebook_object_the_kernel_cannot_find_by_name_says_what_it_is(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    """Made in the cell, it travels by name (its ``__reduce__`` says so): not an install."""
    task(
        ip,
        "class Registry:\n    def __reduce__(self):\n        return 'REGISTRY'\n"
        "REGISTRY = Registry()\nholder = [REGISTRY]\nother = 1",
    )
    said = capsys.readouterr().err
    assert "holder did not come back" in said
    assert "'REGISTRY' is defined in the notebook or a cell" in said
    assert "could not be pickled by value" in said
    assert "install" not in said
    assert "holder" not in ip.user_ns and ip.user_ns["other"] == 1


def test_in_a_kernel_cached_functions_and_properties_travel_and_names_say_what_they_are(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    start_worker()
    _, kc = kernel(kernel_env(settings))

    def ok(code: str) -> str:
        _, msgs, reply = execute(kc, code)
        assert reply["content"]["status"] == "ok", reply["content"]
        return stream_text(msgs)

    ok("%load_ext nbtask")
    ok(
        "%%task --wait\nimport functools\n"
        "@functools.lru_cache(maxsize=None)\ndef sq(n): return n * n\nresult = sq(12)"
    )
    ok("@functools.lru_cache\ndef cube(n): return n ** 3\n")
    ok(
        "class Model:\n    def __init__(self, v): self.v = v\n"
        "    @functools.cached_property\n    def double(self): return self.v * 2\n"
        "model = Model(4)"
    )
    ok(
        "%%task --wait\nc = cube(3)\nd = model.double\n"
        "class M:\n    @functools.cached_property\n    def x(self): return 7\nm = M()"
    )
    shown = ok("print(result, sq(3), sq.cache_parameters(), c, d, vars(model), m.x, M().x)")
    assert "144 9 {'maxsize': None, 'typed': False} 27 8 {'v': 4, 'double': 8} 7 7" in shown
    _, msgs, _ = execute(
        kc,
        "%%task --wait\nclass Registry:\n    def __reduce__(self): return 'REGISTRY'\n"
        "REGISTRY = Registry()",
    )
    said = stream_text(msgs)
    assert "REGISTRY did not come back" in said, said
    assert "'REGISTRY' is defined in the notebook or a cell" in said and "install" not in said
