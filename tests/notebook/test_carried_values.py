"""Values a cell changes through the notebook's functions come back, as they would locally.

A notebook function shipped with a ``%%task`` cell carries the globals it names
(``results`` of ``def record(x): results.append(x)``) though the cell never names them.
Changed in place, through the function or not, such a value comes back like any shipped
value; left unchanged, it does not. A real IPython shell against the real Redis and
worker processes, with ``keep_threshold`` lowered to 1 MiB so that a 2.4 MB array is kept.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.carried import carried_names
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024)


def test_a_list_appended_to_through_a_function_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "results = []\ndef record(name, score):\n    results.append((name, score))")
    task(ip, "for i in range(3):\n    record(f'run{i}', i * 0.1)")
    assert ip.user_ns["results"] == [("run0", 0.0), ("run1", 0.1), ("run2", 0.2)]
    run(ip, "record('local', 1.0)")  # the notebook's function appends to what came back
    assert len(ip.user_ns["results"]) == 4


def test_a_dict_updated_through_a_function_comes_back(ip: InteractiveShell, nb: Session) -> None:
    run(ip, "scores = {'kept': 0}\ndef note(key, value):\n    scores[key] = value")
    task(ip, "note('a', 1)\nnote('b', 2)")
    assert ip.user_ns["scores"] == {"kept": 0, "a": 1, "b": 2}


def test_an_array_changed_in_place_through_a_function_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "import numpy as np\narr = np.zeros(4)\ndef bump(i):\n    arr[i] += 1")
    task(ip, "bump(0)\nbump(3)\nbump(3)")
    np.testing.assert_array_equal(ip.user_ns["arr"], [1.0, 0.0, 0.0, 2.0])


def test_a_value_changed_through_a_function_another_calls_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    run(
        ip,
        "seen = []\ndef record(x):\n    seen.append(x)\n"
        "def record_all(n):\n    for i in range(n):\n        record(i)",
    )
    task(ip, "record_all(3)")
    assert ip.user_ns["seen"] == [0, 1, 2]


def test_a_carried_value_left_unchanged_does_not_come_back(
    ip: InteractiveShell, nb: Session
) -> None:
    """Only what changed travels: the notebook keeps its own object of an unchanged one."""
    run(
        ip,
        "import numpy as np\nlookup = {'a': 1}\nbig = np.arange(1000.0)\nlog = []\n"
        "def score(key):\n    return lookup[key] + big[:1].sum()\n"
        "def record(x):\n    log.append(x)\n"
        "ours = (lookup, big, score)",
    )
    task(ip, "total = score('a')\nrecord(total)", "--wait --out h")
    assert ip.user_ns["total"] == 1.0
    assert ip.user_ns["h"].handle.result(0)["names"] == ["log", "total"]  # what the worker sent
    lookup, big, score = ip.user_ns["ours"]
    assert ip.user_ns["lookup"] is lookup and ip.user_ns["big"] is big
    assert ip.user_ns["score"] is score
    assert ip.user_ns["log"] == [1.0]


def test_a_value_changed_through_a_function_in_a_background_cell_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "results = []\ndef record(x):\n    results.append(x)")
    task(ip, "record(1)\nrecord(2)", "--out h")
    ip.user_ns["h"].get(timeout=60)
    run(ip, "n = len(results)")  # the finished cell is delivered before this one runs
    assert ip.user_ns["n"] == 2


def test_a_large_value_changed_through_a_function_is_kept_as_any_name(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "import numpy as np\nstore = {}\ndef fill(n):\n    store['x'] = np.arange(n * 1.0)")
    task(ip, "fill(300_000)")
    assert isinstance(ip.user_ns["store"], RemoteValue)
    task(ip, "total = float(store['x'].sum())")
    assert ip.user_ns["total"] == float(sum(range(300_000)))


def test_a_value_made_unpicklable_through_a_function_keeps_its_value_as_any_name(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "import threading\nhandles = []\ndef open_one():\n    handles.append(threading.Lock())")
    task(ip, "open_one()\ndone = True")
    said = capsys.readouterr().err
    assert "nbtask: handles did not come back from the worker (list cannot be pickled" in said
    assert "the notebook keeps its value from before the cell" in said
    assert ip.user_ns["done"] is True
    assert ip.user_ns["handles"] == []


def test_a_function_the_cell_gave_an_attribute_comes_back_with_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """A shipped function comes back only when changed, as any shipped value."""
    run(ip, "def count():\n    count.calls += 1\ncount.calls = 0\ndef same():\n    return 1")
    ours = ip.user_ns["same"]
    task(ip, "count()\ncount()\nsame()")
    assert ip.user_ns["count"].calls == 2
    assert ip.user_ns["same"] is ours


def test_a_cell_reading_a_value_a_background_cell_may_change_through_a_function_waits(
    ip: InteractiveShell, nb: Session
) -> None:
    """As locally, where the cells run one after the other: the later one sees the change."""
    run(ip, "results = []\ndef record(x):\n    results.append(x)")
    task(ip, "import time\ntime.sleep(2)\nrecord(1)", "")
    run(ip, "n = len(results)")
    assert ip.user_ns["n"] == 1


def test_a_value_the_notebook_rebinds_meanwhile_is_not_overwritten_by_a_background_cell(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "results = []\ndef record(x):\n    results.append(x)")
    task(ip, "import time\ntime.sleep(2)\nrecord(1)", "--out h")
    run(ip, "results = ['reset']")  # the later cell's value wins, as locally
    ip.user_ns["h"].get(timeout=60)
    run(ip, "n = len(results)")
    assert ip.user_ns["results"] == ["reset"]


def test_names_a_function_reads_are_found_through_the_functions_and_classes_it_names() -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}  # as the notebook's own
    exec(
        "import math\nLIMIT = 3\nseen = []\ntable = {}\nclass Box:\n"
        "    def put(self, x):\n        table[x] = [v for v in seen if v < LIMIT]\n"
        "def inner(x):\n    seen.append(math.floor(x))\n"
        "def outer(x):\n    inner(x)\n    return Box().put(x)\n",
        namespace,
    )
    assert sorted(carried_names({"outer": namespace["outer"]}, namespace)) == ["seen", "table"]
