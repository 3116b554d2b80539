"""Names bound to one kept value stand for one object: kept once, fetched once, ``is`` holds.

Two kept values stand for two objects, though their contents are equal.

A real IPython shell against the real Redis and worker processes, with ``keep_threshold``
lowered to 1 MiB so that a 2.4 MB array is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import held_values
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session

MAKE_X = "import numpy as np\nx = np.arange(300_000.0)"
X_BYTES = 2_400_000


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024)


@pytest.fixture
def fetched(nb: Session, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the blobs the notebook reads from the store, as it reads them."""
    sizes: list[int] = []
    get_blob: Callable[..., Any] = nb.app.store.get_blob

    def counting(digest: str, size: int, *args: Any, **kwargs: Any) -> Any:
        sizes.append(size)
        return get_blob(digest, size, *args, **kwargs)

    monkeypatch.setattr(nb.app.store, "get_blob", counting)
    return sizes


def held_on_workers(nb: Session) -> list[tuple[str, int]]:
    """The kept values the worker processes announce they hold: (name, size)."""
    return [(held.name, held.size) for held in held_values(nb.app)]


@pytest.mark.parametrize("count", [300_000, 5_000_000], ids=["2.4MB", "40MB-sealed"])
@pytest.mark.parametrize("later", [False, True], ids=["in-the-same-cell", "in-a-later-cell"])
def test_two_names_for_one_kept_value_keep_fetch_and_are_one_object(
    ip: InteractiveShell, nb: Session, fetched: list[int], count: int, later: bool
) -> None:
    """Kept once (a 40 MB value, whose copy is sealed, was held and stored twice), fetched once."""
    make = f"import numpy as np\nx = np.arange({count}.0)"
    for cell in [make, "alias = x"] if later else [make + "\nalias = x"]:
        task(ip, cell)
    assert isinstance(ip.user_ns["x"], RemoteValue)
    held = held_on_workers(nb)
    assert len(held) == 1 and held[0][1] >= 8 * count, f"kept more than once: {held}"
    assert run(ip, "alias is x") is True, "one value came back as two objects"
    assert isinstance(ip.user_ns["x"], np.ndarray)
    assert 8 * count <= sum(fetched) < 16 * count, f"fetched {sum(fetched):,} bytes"


def test_a_kept_value_changed_in_place_is_changed_under_every_name(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X + "\nalias = x")
    task(ip, "x[0] = -1.0")  # as locally, alias is the array that changed
    assert run(ip, "float(alias[0]), alias is x") == (-1.0, True)


def test_a_kept_value_fetched_through_one_name_is_the_same_object_through_another(
    ip: InteractiveShell, nb: Session, fetched: list[int]
) -> None:
    task(ip, MAKE_X + "\nalias = x")
    run(ip, "y = x.fetch()")
    assert run(ip, "y is x.fetch() and y is alias.fetch()") is True
    assert run(ip, "y is alias") is True  # a local read of alias: the object fetched
    assert X_BYTES <= sum(fetched) < 2 * X_BYTES, f"fetched {sum(fetched):,} bytes"


def test_a_later_cell_that_renames_a_kept_value_sends_back_its_reference(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    task(ip, "alias = x\ndel x")
    assert "x" not in ip.user_ns
    assert ip.user_ns["alias"] is kept, "the value came back as a new reference"
    assert [name for name, _ in held_on_workers(nb)] == ["x"], "kept a second time"
    assert run(ip, "float(alias[-1])") == 299_999.0


def test_a_renamed_kept_value_the_notebook_let_go_while_its_cell_ran_stays_usable(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    task(ip, "import time\ntime.sleep(1)\nalias = x", "--out h")  # in the background
    run(ip, "del x")  # the notebook's last name for it, while the cell runs
    ip.user_ns["h"].result(timeout=30)  # it ended, its values not yet written
    nb.releases.flush()  # as the session's ticker does, twice a second
    assert run(ip, "float(alias[-1])") == 299_999.0


def test_a_kept_value_is_named_by_a_name_the_notebook_binds_to_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """Its preview and its errors name ``alias`` once ``x``, the name it was kept under, went."""
    task(ip, MAKE_X + "\nalias = x")
    assert repr(ip.user_ns["alias"]).startswith("<x: kept on the workers")  # x still is
    run(ip, "del x")
    said = repr(ip.user_ns["alias"])
    assert said.startswith("<alias: kept on the workers"), said
    assert "x.fetch()" not in said and "alias.fetch() does so now" in said
    with pytest.raises(TypeError, match=r"^len\(alias\): alias \(numpy.ndarray\) is kept"):
        len(ip.user_ns["alias"])


@pytest.mark.brokers()
@pytest.mark.parametrize(
    "cells",
    [
        [("seen = []\nerrors = []", "--wait --keep seen --keep errors")],
        [("seen = np.zeros(300_000)", "--wait"), ("errors = np.zeros(300_000)", "--wait")],
    ],
    ids=["two-lists-one-cell", "two-arrays-two-cells"],
)
def test_two_kept_values_with_equal_contents_stay_two_objects(
    ip: InteractiveShell, nb: Session, broker_kind: str, cells: list[tuple[str, str]]
) -> None:
    """Equal bytes, two objects in the notebook: two on the workers (were one, held by content)."""
    run(ip, "import numpy as np")
    for cell, line in cells:
        task(ip, cell, line)
    assert ip.user_ns["seen"].keeper != ip.user_ns["errors"].keeper
    task(ip, "same = seen is errors\nseen += [1.0]\ntotal = float(sum(errors))")
    assert ip.user_ns["same"] is False, "two kept values were one object in a %%task cell"
    assert ip.user_ns["total"] == 0.0, "changing seen changed errors"
    assert run(ip, "seen is not errors and float(sum(seen)) > 0.0 == float(sum(errors))")


@pytest.mark.brokers()
def test_a_function_task_given_two_kept_values_with_equal_contents_gets_two_objects(
    ip: InteractiveShell, nb: Session, broker_kind: str
) -> None:
    """A value passed twice (``f(seen, seen)``) is one object still, as locally."""
    task(ip, "seen = []\nerrors = []", "--wait --keep seen --keep errors")

    @nb.app.task
    def add_and_len(a: list[str], b: list[str]) -> list[Any]:
        a.append("a.csv")
        return [len(b), a is b]

    ip.user_ns["add_and_len"] = add_and_len
    assert run(ip, "add_and_len.delay(seen, errors).get(timeout=30)") == [0, False]
    assert run(ip, "add_and_len.delay(errors, errors).get(timeout=30)") == [1, True]


def test_a_kept_value_inside_a_container_of_its_cell_is_one_object_with_its_name(
    ip: InteractiveShell, nb: Session, fetched: list[int]
) -> None:
    """``d = {"k": x}``, ``pair = (x, 1)``: kept once, and ``d["k"] is x`` once fetched."""
    task(ip, MAKE_X + "\nd = {'k': x}\npair = (x, 1)\nnested = [[x]]")
    assert [name for name, _ in held_on_workers(nb)] == ["x"], "x was kept more than once"
    assert ip.user_ns["d"]["k"] is ip.user_ns["x"], "d came back holding a copy of x"
    assert not fetched, "the kernel fetched values no cell read"
    run(ip, "x[0] = 5.0")
    assert run(ip, "float(d['k'][0]), d['k'] is x, pair[0] is x, nested[0][0] is x") == (
        5.0,
        True,
        True,
        True,
    )
    assert X_BYTES <= sum(fetched) < 2 * X_BYTES, f"fetched {sum(fetched):,} bytes"


def test_a_container_of_a_kept_value_sees_a_later_task_cells_change_to_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """A later ``%%task`` cell that changes ``df`` in place changes ``data["train"]`` too."""
    task(ip, "import pandas as pd\ndf = pd.DataFrame({'a': range(300_000)})\ndata = {'train': df}")
    assert isinstance(ip.user_ns["df"], RemoteValue)
    task(ip, "df['g'] = 1")
    task(ip, "same = data['train'] is df\ncolumns = list(data['train'].columns)")
    assert ip.user_ns["same"] is True and ip.user_ns["columns"] == ["a", "g"]
    assert run(ip, "list(data['train'].columns), data['train'] is df") == (["a", "g"], True)


def test_a_container_a_later_task_cell_changes_comes_back_holding_the_kept_value_itself(
    ip: InteractiveShell, nb: Session, fetched: list[int]
) -> None:
    """``d["n"] = 1`` on a ``d`` holding ``x``: ``d`` comes back holding ``x``'s reference,
    ``x``'s bytes neither sent to the kernel nor kept a second time."""
    task(ip, MAKE_X + "\nd = {'k': x}")
    task(ip, "d['n'] = 1\nsame = d['k'] is x")
    assert ip.user_ns["same"] is True
    assert ip.user_ns["d"]["k"] is ip.user_ns["x"] and ip.user_ns["d"]["n"] == 1
    assert [name for name, _ in held_on_workers(nb)] == ["x"], "x was kept more than once"
    assert not fetched, "the kernel fetched values no cell read"
