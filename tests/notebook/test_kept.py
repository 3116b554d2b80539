"""Large values a ``%%task`` cell assigns stay on the workers until the notebook uses them.

A real IPython shell against the real Redis and worker processes, with ``keep_threshold``
lowered to 1 MiB so that a 2.4 MB array is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.errors import BlobError
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session

MAKE_X = "import numpy as np\nx = np.arange(300_000.0)\nm = float(x.mean())"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024)


def test_a_large_assigned_value_stays_on_the_workers_with_a_preview(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    assert isinstance(kept, RemoteValue)
    assert ip.user_ns["m"] == pytest.approx(149_999.5)  # small names come back as they are
    text = repr(kept)
    assert "kept on the workers" in text and "shape=(300000,)" in text
    assert "dtype=float64" in text and "2,400,000 bytes" in text
    assert "0.00000e+00" in text or "0.0" in text  # the start of the array's own repr


def test_a_local_cell_that_reads_a_kept_value_fetches_it(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    task(ip, MAKE_X)
    run(ip, "x")  # showing it shows its preview: nothing is fetched
    assert isinstance(ip.user_ns["x"], RemoteValue)
    run(ip, "head = x[:3].tolist()")
    assert ip.user_ns["head"] == [0.0, 1.0, 2.0]
    assert isinstance(ip.user_ns["x"], np.ndarray)
    assert "fetching x (2.4 MB) from the workers" in capsys.readouterr().out


def test_store_of_a_kept_value_stores_the_value_as_locally(
    ip: InteractiveShell, nb: Session, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, %store saved the reference (`Stored 'x' (RemoteValue)`), which a new kernel
    # could not fetch once this session released it.
    database = type(ip.db)  # IPython's own (pickleshare), in a folder of the test's
    monkeypatch.setattr(ip, "db", database(tmp_path / "db"))
    ip.extension_manager.load_extension("storemagic")
    task(ip, MAKE_X)
    run(ip, "%store x")
    assert isinstance(ip.user_ns["x"], np.ndarray)
    stored = database(tmp_path / "db")["autorestore/x"]
    assert isinstance(stored, np.ndarray) and stored.shape == (300_000,)


def test_a_later_task_cell_uses_a_kept_value_in_place(ip: InteractiveShell, nb: Session) -> None:
    task(ip, MAKE_X)
    reference = ip.user_ns["x"]
    task(ip, "total = float(x.sum())")
    assert ip.user_ns["total"] == pytest.approx(float(np.arange(300_000.0).sum()))
    assert ip.user_ns["x"] is reference, "a value the cell only read came back"
    task(ip, "x[0] = -1.0")  # changed in place on the worker: kept again, changed
    changed = ip.user_ns["x"]
    assert isinstance(changed, RemoteValue) and changed is not reference
    assert changed.fetch()[0] == -1.0


def test_a_kept_value_passed_to_a_function_task_stays_out_of_the_kernel(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)

    @nb.app.task
    def total(values: Any, more: Any = ()) -> float:
        return float(values.sum()) + sum(float(v.sum()) for v in more)

    ip.user_ns["total"] = total
    run(ip, "s = total.delay(x).get(timeout=30)")
    run(ip, "t = total.apply_async(args=(x,), kwargs={'more': [x]}).get(timeout=30)")
    expected = float(np.arange(300_000.0).sum())
    assert ip.user_ns["s"] == pytest.approx(expected)
    assert ip.user_ns["t"] == pytest.approx(2 * expected)
    assert isinstance(ip.user_ns["x"], RemoteValue), "the kernel fetched a value it only sent"
    run(ip, "u = total.delay(x * 1)")  # computed on in the kernel: fetched first
    assert isinstance(ip.user_ns["x"], np.ndarray)


def test_keep_and_fetch_choose_per_name(ip: InteractiveShell, nb: Session) -> None:
    task(ip, MAKE_X + "\nsmall = [1, 2, 3]", "--wait --fetch x --keep small")
    assert isinstance(ip.user_ns["x"], np.ndarray)
    small = ip.user_ns["small"]
    assert isinstance(small, RemoteValue) and small.fetch() == [1, 2, 3]


def test_a_background_cell_then_a_local_read_waits_and_fetches(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X, "")
    run(ip, "last = float(x[-1])")
    assert ip.user_ns["last"] == 299_999.0


def test_a_value_whose_store_copy_is_written_after_its_cell_is_read_whole(
    ip: InteractiveShell, nb: Session
) -> None:
    # 40 MB: over LATER_BYTES, so the worker writes its store copy after the cell ended.
    task(ip, "import numpy as np\nbig = np.arange(5_000_000.0)")
    run(ip, "last = float(big[-1])")  # a local read right away: it waits for the copy
    assert ip.user_ns["last"] == 4_999_999.0
    task(ip, MAKE_X + "\nbig2 = np.arange(5_000_000.0) * 2", "")
    task(ip, "total = float(big2.sum())")  # on the holder, which holds it live
    assert ip.user_ns["total"] == pytest.approx(float(np.arange(5_000_000.0).sum()) * 2)
    run(ip, "first = float(big2[1])")
    assert ip.user_ns["first"] == 2.0


def test_a_value_changed_in_place_while_its_copy_is_written_leaves_its_twin_whole(
    ip: InteractiveShell, nb: Session
) -> None:
    # Two 40 MB names with the same bytes share one blob; the second one's copy is
    # written from its live buffer, which the next cell on the holder changes in place.
    task(ip, "import numpy as np\nbase = np.arange(5_000_000.0)\ndata = base.copy()")
    task(ip, "data += 1.0")
    run(ip, "b1 = float(base[1])")  # fetched from the store copy of the untouched twin
    assert ip.user_ns["b1"] == 1.0
    task(ip, "d1 = float(data[1])")
    assert ip.user_ns["d1"] == 2.0


def test_fetching_over_the_budget_is_refused_saying_how_to_raise_it(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    kept.bind(nb.app.store.get_blob, 1_000_000)
    with pytest.raises(BlobError, match=r"over the fetch budget .*NBTASK_FETCH_BUDGET"):
        kept.fetch()
    assert kept.fetch(force=True)[-1] == 299_999.0
    result = ip.run_cell("x.sum()")
    assert isinstance(result.error_in_exec, BlobError)


def test_a_large_last_expression_is_kept_as_its_out_and_fetched_when_read(
    ip: InteractiveShell, nb: Session
) -> None:
    """A ``--wait`` cell's ``Out`` is kept as an assigned name would be: a reference."""
    result = ip.run_cell("%%task --wait\nimport numpy as np\nnp.arange(300_000.0)", True)
    assert result.error_in_exec is None, result
    count = ip.execution_count - 1
    kept = ip.user_ns["_"]
    assert isinstance(kept, RemoteValue) and ip.user_ns["Out"][count] is kept
    assert f"_{count}: kept on the workers" in repr(kept) and "shape=(300000,)" in repr(kept)
    run(ip, f"last = float(_{count}[-1])")  # a local cell that reads it fetches it
    assert ip.user_ns["last"] == 299_999.0
    assert isinstance(ip.user_ns[f"_{count}"], np.ndarray)
    # Shown by the name it is assigned to: one reference, one copy on the workers.
    ip.run_cell("%%task --wait\n" + MAKE_X + "\nx", True)
    assert isinstance(ip.user_ns["x"], RemoteValue) and ip.user_ns["_"] is ip.user_ns["x"]


def test_a_kept_value_a_cells_handle_gives_is_fetched_where_read_as_the_notebooks_own(
    ip: InteractiveShell, nb: Session
) -> None:
    """``h.get()["x"]`` (and ``app.handle(id).get()``) is the notebook's ``x``, fetched."""
    task(ip, MAKE_X, "--wait --out h")
    assert run(ip, "float(h.get()['x'][2])") == 2.0
    assert isinstance(ip.user_ns["x"], np.ndarray), "x was fetched, but not as x"
    assert run(ip, "h.get()['x'] is x, h.get().get('x') is x") == (True, True)
    task(ip, MAKE_X.replace("x", "y"), "--wait --out g")
    ip.user_ns["app"] = nb.app
    assert run(ip, "float(app.handle(g.id).get()['y'][2])") == 2.0


def test_a_container_holding_a_kept_value_is_usable_in_a_task_cell_and_a_local_cell(
    ip: InteractiveShell, nb: Session
) -> None:
    """``r = h.get()`` holds ``x``'s reference: a ``%%task`` cell sent ``r`` gets the array,
    the kernel fetching nothing; a local cell reading ``r`` fetches it into ``r``."""
    task(ip, MAKE_X, "--wait --out h")
    run(ip, "r = h.get()")
    task(ip, "first = float(r['x'][1])\nsame = r['x'] is x\nn = len(r['x'])")
    assert ip.user_ns["first"] == 1.0 and ip.user_ns["n"] == 300_000
    assert isinstance(ip.user_ns["x"], RemoteValue), "the kernel fetched a value it only sent"
    task(ip, "same = r['x'] is x")
    assert ip.user_ns["same"] is True, "one kept value came into the cell as two objects"
    assert run(ip, "float(r['x'][2]), r['x'] is x") == (2.0, True)


def test_a_large_last_expression_read_through_out_is_fetched_alone(
    ip: InteractiveShell, nb: Session
) -> None:
    """``Out[n][:3]`` fetches that output, as ``_n[:3]`` does; other kept outputs stay."""
    ip.run_cell("%%task --wait\nimport numpy as np\nnp.arange(300_000.0)", True)
    first = ip.execution_count - 1
    ip.run_cell("%%task --wait\nimport numpy as np\nnp.arange(300_000.0) * 2", True)
    second = ip.execution_count - 1
    assert run(ip, f"float(Out[{second}][2])") == 4.0
    out = ip.user_ns["Out"]
    assert isinstance(out[second], np.ndarray) and isinstance(out[first], RemoteValue)
