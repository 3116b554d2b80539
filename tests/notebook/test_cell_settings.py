"""numpy's print options and floating-point error handling, the ``decimal`` context and the
recursion limit follow the notebook both ways, as the other process-wide settings do
(test_cell_environment.py)."""

from __future__ import annotations

import decimal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import execute, kernel_env, stream_text
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.session import Session

#: A function recursing ``n`` deep, defined in the cell that calls it.
_DOWN = "def down(n):\n    return 0 if n == 0 else 1 + down(n - 1)\n"


@pytest.fixture
def numpy_settings() -> Iterator[None]:
    """This process's numpy print options and error handling, put back after the test."""
    options, errors = np.get_printoptions(), np.geterr()
    yield
    np.set_printoptions(**options)
    np.seterr(**errors)


@pytest.fixture
def decimal_settings() -> Iterator[None]:
    """This thread's decimal context, put back after the test."""
    context = decimal.getcontext().copy()
    yield
    decimal.setcontext(context)


@pytest.fixture
def recursion_limit() -> Iterator[int]:
    """This process's recursion limit, put back after the test."""
    limit = sys.getrecursionlimit()
    yield limit
    sys.setrecursionlimit(limit)


def test_numpy_print_options_follow_the_notebook_both_ways(
    ip: InteractiveShell, nb: Session, numpy_settings: None
) -> None:
    run(ip, "import numpy as np\nnp.set_printoptions(precision=2)")
    task(ip, "shown = str(np.array([1 / 3]))")
    assert ip.user_ns["shown"] == "[0.33]"  # as locally
    task(ip, "np.set_printoptions(precision=3, suppress=True)")
    assert (np.get_printoptions()["precision"], np.get_printoptions()["suppress"]) == (3, True)
    task(ip, "again = str(np.array([1 / 3]))")  # the cell's setting stays, as locally
    assert ip.user_ns["again"] == "[0.333]"


def test_numpy_error_handling_follows_the_notebook_both_ways(
    ip: InteractiveShell, nb: Session, numpy_settings: None
) -> None:
    run(ip, "import numpy as np\nnp.seterr(all='raise')")
    with pytest.raises(FloatingPointError, match="divide by zero"):
        task(ip, "np.array([1.0]) / 0")
    task(ip, "np.seterr(divide='ignore', under='warn')")
    assert np.geterr() == {"divide": "ignore", "over": "raise", "under": "warn", "invalid": "raise"}
    task(ip, "quotient = (np.array([1.0]) / 0)[0]")  # ignored now, as it would be locally
    assert ip.user_ns["quotient"] == np.inf


def test_the_decimal_context_follows_the_notebook_both_ways_and_plain_tasks_keep_their_own(
    ip: InteractiveShell, loaded: Session, start_worker: Any, decimal_settings: None
) -> None:
    start_worker(concurrency=1)  # every cell and task in one process
    own = loaded.app.send_task("tests.sample_tasks.decimal_third").get(30)
    assert own == "0." + "3" * 28  # decimal's default context
    # Before, a cell computed with the worker's context: 28 digits, rounded half even.
    run(ip, "import decimal\ndecimal.getcontext().prec = 40\n")
    run(ip, "decimal.getcontext().rounding = decimal.ROUND_UP")
    task(ip, "third = str(decimal.Decimal(1) / 3)")
    assert ip.user_ns["third"] == "0." + "3" * 39 + "4"  # as locally
    task(
        ip, "decimal.getcontext().prec = 5\ndecimal.getcontext().traps[decimal.DivisionByZero] = 0"
    )
    context = decimal.getcontext()
    assert (context.prec, context.rounding) == (5, decimal.ROUND_UP)  # as the cell left it
    assert not context.traps[decimal.DivisionByZero] and context.traps[decimal.InvalidOperation]
    task(ip, "again = str(decimal.Decimal(2) / 3)\ninfinite = str(decimal.Decimal(1) / 0)")
    assert (ip.user_ns["again"], ip.user_ns["infinite"]) == ("0.66667", "Infinity")
    # A plain task in the same process finds the process's own context, not the notebook's.
    assert loaded.app.send_task("tests.sample_tasks.decimal_third").get(30) == own
    task(ip, "last = str(decimal.Decimal(1) / 3)")  # and the next cell the notebook's again
    assert ip.user_ns["last"] == "0.33334"


def test_the_recursion_limit_follows_the_notebook_both_ways_and_plain_tasks_keep_their_own(
    ip: InteractiveShell, loaded: Session, start_worker: Any, recursion_limit: int
) -> None:
    start_worker(concurrency=1)  # every cell and task in one process
    # The worker's own limit once it runs cells (IPython's completer, jedi, raises it).
    task(ip, "first = 1")
    own = loaded.app.send_task("tests.sample_tasks.recursion_limit").get(30)
    run(ip, "import sys\nsys.setrecursionlimit(5000)")
    task(ip, _DOWN + "depth = down(3000)")
    # The state as the cell before left it (not applied again): the limit is still the cell's.
    task(ip, _DOWN + "again = (down(3000), sys.getrecursionlimit())")
    assert (ip.user_ns["depth"], ip.user_ns["again"]) == (3000, (3000, 5000))
    # A plain task in the same process finds the process's own limit, not the notebook's.
    assert loaded.app.send_task("tests.sample_tasks.recursion_limit").get(30) == own
    task(ip, "sys.setrecursionlimit(4321)")
    assert sys.getrecursionlimit() == 4321  # as the cell would have left it locally
    task(ip, "seen = sys.getrecursionlimit()")
    assert ip.user_ns["seen"] == 4321
    assert loaded.app.send_task("tests.sample_tasks.recursion_limit").get(30) == own


def test_numpy_settings_a_background_cell_changes_stay_in_a_real_kernel(
    run_in_kernel: Callable[[str], str],
) -> None:
    """Brought back as the next cell starts, they stay for the cells after it, as locally.

    numpy keeps them in context variables: in the kernel's context, not in one of its own.
    """
    run_in_kernel("import numpy as np\nnp.set_printoptions(precision=2)\nnp.seterr(divide='raise')")
    run_in_kernel("%%task\nshown = str(np.array([1 / 3]))\nnp.set_printoptions(precision=4)")
    assert "[0.33]" in run_in_kernel("print(shown)")  # waits for the cell, takes its changes
    printed = run_in_kernel("print(np.array([1 / 3]), np.geterr()['divide'])")
    assert printed.strip() == "[0.3333] raise"


def _displays_of(client: Any) -> Callable[[str], list[dict[str, Any]]]:
    """What runs code in a kernel (``client``'s), giving the displays it showed."""

    def shown(code: str) -> list[dict[str, Any]]:
        _, msgs, reply = execute(client, code)
        assert reply["content"]["status"] == "ok", (reply["content"], stream_text(msgs))
        return [m["content"] for m in msgs if m["msg_type"] == "display_data"]

    return shown


def test_the_inline_backends_figure_formats_follow_the_notebook_both_ways(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    """``%config InlineBackend.figure_formats``: a cell's figures come as the notebook's."""
    start_worker()
    shown = _displays_of(kernel(kernel_env(settings))[1])
    shown("%load_ext nbtask")
    shown("import matplotlib.pyplot as plt\n%config InlineBackend.figure_formats = ['svg']")
    figures = shown("%%task --wait\nplt.plot([1, 2])\nplt.show()")
    assert [sorted(figure["data"]) for figure in figures] == [["image/svg+xml", "text/plain"]]
    shown("%%task --wait\n%config InlineBackend.figure_formats = ['retina']")
    figures = shown("plt.plot([1, 2])\nplt.show()")  # in the kernel: as the cell set it
    assert [sorted(figure["data"]) for figure in figures] == [["image/png", "text/plain"]]
    assert "width" in figures[0]["metadata"]["image/png"]  # a retina PNG is shown half size
    # The kernel's backend is set up now (it showed a figure): its own settings go and come.
    shown("%%task --wait\n%config InlineBackend.figure_format = 'svg'")
    figures = shown("plt.plot([1, 2])\nplt.show()")
    assert [sorted(figure["data"]) for figure in figures] == [["image/svg+xml", "text/plain"]]
    shown("%config InlineBackend.figure_formats = ['retina']")
    figures = shown("%%task --wait\nplt.plot([1, 2])\nplt.show()")
    assert "width" in figures[0]["metadata"]["image/png"]


def test_the_older_figure_format_a_cell_sets_before_any_figure_comes_back(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    """``%config InlineBackend.figure_format`` (the older name) after ``figure_formats``,
    in a process that has shown no figure yet: the one set last wins, as the backend
    takes them from the config. Before, a worker kept the ``figure_formats`` it was given."""
    start_worker(concurrency=1)
    shown = _displays_of(kernel(kernel_env(settings))[1])
    shown("%load_ext nbtask")
    shown("import matplotlib.pyplot as plt\n%config InlineBackend.figure_formats = ['retina']")
    shown("%%task --wait\n%config InlineBackend.figure_format = 'svg'")
    figures = shown("plt.plot([1, 2])\nplt.show()")
    assert [sorted(figure["data"]) for figure in figures] == [["image/svg+xml", "text/plain"]]
