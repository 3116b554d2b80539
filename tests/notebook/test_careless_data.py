"""What a careless notebook user gets from kept values: only what is used is fetched.

Code that reaches a reference instead of its value gets one error saying what to do. A
real IPython shell against the real Redis and worker processes, with ``keep_threshold``
lowered to 1 MiB so that a 2.4 MB array is kept. A kept value the kernel fetched is an
array in the namespace; one it did not is still a :class:`RemoteValue`.
"""

from __future__ import annotations

import gc
import os
import re
import weakref
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import ROOT, broker_env, wait_until
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client.manager import KernelManager

from nbtask import App, Settings, State
from nbtask.errors import BlobError, CellError
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.magics import session_of
from nbtask.notebook.session import Session

MAKE_X = "import numpy as np\nx = np.arange(300_000.0)"
TOTAL = float(sum(range(300_000)))


@pytest.fixture
def fetch_budget() -> int:
    """The notebook's ``fetch_budget``: the default, unless a test parametrizes its own."""
    return Settings().fetch_budget


#: A fetch of ``x`` (2.4 MB) is refused: a cell that fetched it would fail.
NO_FETCH = pytest.mark.parametrize("fetch_budget", [1000], ids=["fetch_budget-1000"])


@pytest.fixture
def settings(settings: Settings, fetch_budget: int) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024, fetch_budget=fetch_budget)


def test_a_task_cell_reading_a_value_a_background_cell_kept_uses_it_in_place(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X, "")  # in the background: x is pending, then kept
    task(ip, "total = float(x.sum())")
    assert ip.user_ns["total"] == TOTAL
    assert isinstance(ip.user_ns["x"], RemoteValue), "the kernel fetched x to ship it back"


@NO_FETCH
def test_a_pending_kept_value_only_shown_or_passed_to_a_task_is_not_fetched(
    ip: InteractiveShell, nb: Session
) -> None:
    @nb.app.task
    def total(values: Any) -> float:
        return float(values.sum())

    ip.user_ns["total"] = total
    task(ip, MAKE_X, "")
    run(ip, "s = total.delay(x).get(timeout=30)")  # waits for x, sends the reference
    assert ip.user_ns["s"] == TOTAL
    assert isinstance(ip.user_ns["x"], RemoteValue)
    task(ip, MAKE_X, "")
    run(ip, "x")  # waits for x, shows its preview as for a value already delivered
    assert isinstance(ip.user_ns["x"], RemoteValue)


def test_x_fetch_in_a_cell_is_the_cells_own_fetch_with_force_past_the_budget(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    run(ip, "head = x.fetch()[:3].tolist()")  # not fetched for the cell first
    assert ip.user_ns["head"] == [0.0, 1.0, 2.0]
    assert isinstance(ip.user_ns["x"], RemoteValue)
    ip.user_ns["x"].bind(nb.app.store.get_blob, 1000)
    result = ip.run_cell("last = x.fetch()[-1]")
    assert isinstance(result.error_in_exec, BlobError), result.error_in_exec
    run(ip, "last = x.fetch(force=True)[-1]")  # as the budget's error says to
    assert ip.user_ns["last"] == 299_999.0


@NO_FETCH
@pytest.mark.parametrize(
    "code",
    [
        "x = x.fetch(force=True)\nfirst = float(x[0])",
        "x = x.fetch(force=True); first = x.min()",
        "if isinstance(x, RemoteValue):\n    x = x.fetch(force=True)\nfirst = float(x[0])",
    ],
)
def test_a_cell_that_fetches_a_kept_value_itself_then_uses_it_fetches_nothing_first(
    ip: InteractiveShell, nb: Session, code: str
) -> None:
    task(ip, MAKE_X)
    ip.user_ns["RemoteValue"] = RemoteValue
    refused = ip.run_cell("first = float(x[0])").error_in_exec
    assert isinstance(refused, BlobError) and "x = x.fetch(force=True)" in str(refused), refused
    run(ip, code)  # as it says: the uses after the cell's own fetch read the array
    assert ip.user_ns["first"] == 0.0
    assert not isinstance(ip.user_ns["x"], RemoteValue)


def test_a_retried_cell_starts_from_the_kept_value_as_it_was_sent(
    ip: InteractiveShell, nb: Session, tmp_path: Path
) -> None:
    ip.user_ns["flag"] = str(tmp_path / "tried")
    task(ip, MAKE_X)
    # The first try changes x in place, then fails: the retry must not add to its change.
    cell = (
        "import os\nx[0] += 1\nif not os.path.exists(flag):\n"
        "    open(flag, 'w').close()\n    raise ValueError('first try')"
    )
    task(ip, cell, "--wait --retries 1")
    task(ip, "on_worker = float(x[0])")
    assert ip.user_ns["on_worker"] == 1.0
    assert run(ip, "float(x[0])") == 1.0


@NO_FETCH
def test_a_fetch_refused_leaves_nothing_holding_the_reference_once_it_is_fetched(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    reference = weakref.ref(ip.user_ns["x"])
    assert isinstance(ip.run_cell("first = float(x[0])").error_in_exec, BlobError)
    run(ip, "x = x.fetch(force=True)")
    gc.collect()
    # The refused fetch's traceback (sys.last_traceback) would keep it, so the holder would
    # never be told to release it.
    assert reference() is None, gc.get_referrers(reference())


@NO_FETCH
@pytest.mark.parametrize("background", [False, True], ids=["delivered", "pending"])
def test_deleting_a_kept_value_fetches_nothing_even_over_the_fetch_budget(
    ip: InteractiveShell, nb: Session, background: bool
) -> None:
    task(ip, MAKE_X, "" if background else "--wait")
    run(ip, "del x")
    assert "x" not in ip.user_ns


def test_a_kept_value_whose_store_copy_is_gone_says_so_in_one_line_naming_it(
    ip: InteractiveShell, nb: Session, settings: Settings, r: redis.Redis
) -> None:
    made_by = f"Cell In[{ip.execution_count}]"
    task(ip, MAKE_X)
    keys = list(r.scan_iter(match=f"{settings.key_prefix}:blob:*", count=1000))
    assert keys, "x was not kept"
    r.delete(*keys)  # expired, or deleted by someone who can write to Redis
    result = ip.run_cell("y = x + 1")
    error = result.error_in_exec
    assert isinstance(error, BlobError)
    assert str(error).startswith("x cannot be fetched: a large value"), error
    # The remedy names the cell that made x, not "the task".
    assert str(error).endswith(f"; run {made_by} again to make it"), error
    assert error._render_traceback_() == [f"BlobError: {error}"]  # type: ignore[attr-defined]
    assert isinstance(ip.user_ns["x"], RemoteValue)  # still there, for a %%task cell


@pytest.mark.parametrize(
    ("code", "error", "use"),
    [
        ("eval('x.mean()')", AttributeError, "x.mean"),
        ("eval('x[0]')", TypeError, r"x\[...\]"),
        ("eval('len(x)')", TypeError, r"len\(x\)"),
        ("list(vars()[chr(120)])", TypeError, r"iter\(x\)"),
        ("import numpy as np\nnp.mean(eval('x'))", TypeError, r"numpy.asarray\(x\)"),
    ],
)
def test_code_that_reaches_a_kept_value_without_naming_it_is_told_to_fetch_it(
    ip: InteractiveShell, nb: Session, code: str, error: type[Exception], use: str
) -> None:
    task(ip, MAKE_X)
    result = ip.run_cell(code)
    assert isinstance(result.error_in_exec, error)
    assert re.match(
        rf"{use}: x \(numpy.ndarray\) is kept on the workers, .* so it was not fetched: "
        r"fetch it first \(x = x.fetch\(\), ",
        str(result.error_in_exec),
    ), result.error_in_exec
    assert isinstance(ip.user_ns["x"], RemoteValue) and ip.user_ns["x"]  # still there


@pytest.mark.parametrize("code", ["eval('x.mean()')", "eval('x[0]')", "len(eval('x'))"])
def test_the_error_of_code_that_reached_a_kept_value_does_not_keep_it(
    ip: InteractiveShell, nb: Session, code: str
) -> None:
    task(ip, MAKE_X)
    reference = weakref.ref(ip.user_ns["x"])
    assert ip.run_cell(code).error_in_exec is not None
    run(ip, "x = x.fetch()")  # as the error says; the notebook keeps the error (sys.last_value)
    gc.collect()
    # Kept, the reference would keep the value on its holder: never released.
    assert reference() is None, gc.get_referrers(reference())


def test_a_kept_value_used_after_its_session_ended_says_it_was_released(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    ip.run_line_magic("unload_ext", "nbtask")  # releases what the session kept
    released = r"x was released when its nbtask session ended \(%unload_ext nbtask, or the "
    with pytest.raises(BlobError, match=released + r".*Run Cell In\[\d+\] again to make it"):
        kept.fetch()
    result = ip.run_cell("x[:3]")
    assert isinstance(result.error_in_exec, TypeError)
    assert re.search(released, str(result.error_in_exec))
    assert repr(kept).startswith("<x: released when its nbtask session ended")


@pytest.mark.parametrize(
    ("source", "name"), [("y = h.get(timeout=30)", "h"), ("ys = [g.get() for g in hs]", "hs")]
)
def test_a_task_cell_reading_a_task_handle_is_refused_before_sending(
    ip: InteractiveShell, nb: Session, source: str, name: str
) -> None:
    @nb.app.task
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.delay(1, 2)
    assert handle.get(timeout=30) == 3
    ip.user_ns.update(h=handle, hs=[handle])
    refused = rf"'{name}' holds the handle of task .*add\[{handle.id}\]: a %%task cell cannot use"
    with pytest.raises(CellError, match=refused + r" .*\(h.get\(\)\).*Nothing was sent"):
        task(ip, source)
    assert nb.pending.runs == []


def blob_keys(settings: Settings) -> list[bytes]:
    client = redis.Redis.from_url(settings.broker_url or "")
    try:
        return list(client.scan_iter(match=f"{settings.key_prefix}:blob*", count=1000))
    finally:
        client.close()


def nothing_held(settings: Settings) -> bool:
    """No blob of the test's prefix in the store, and no value held by a worker process."""
    reader = App("reader", settings=settings)
    try:
        consumers = [c for info in reader.workers().values() for c in info.consumers]
        held = any(h.values for h in reader.store.holdings(consumers).values())
    finally:
        reader.close()
    return not held and not blob_keys(settings)


@pytest.mark.parametrize("running", [False, True], ids=["idle", "a-cell-running"])
def test_a_kernel_shutting_down_releases_what_its_session_kept(
    settings: Settings, start_worker: Any, tmp_path: Path, running: bool
) -> None:
    """As Jupyter's "Shut Down Kernel" (no unload). A background cell still running runs
    on (a restarted kernel finds it), and what it does not read is released all the same."""
    start_worker(concurrency=2)
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    km.start_kernel(env={**os.environ, **broker_env(settings)}, cwd=str(ROOT))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        client.execute_interactive("%load_ext nbtask", timeout=60)
        reply = client.execute_interactive(f"%%task --wait\n{MAKE_X}", timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert blob_keys(settings), "x was not kept"
        if running:
            client.execute_interactive("%%task\nimport time\ntime.sleep(3)\ny = 1", timeout=60)
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=False)
    wait_until(lambda: nothing_held(settings), 30, "what the session kept to be released")


def test_ending_a_session_cancels_its_running_cells_and_releases_what_they_kept(
    ip: InteractiveShell, nb: Session, settings: Settings
) -> None:
    task(ip, "import time\ntime.sleep(1)\n" + MAKE_X, "")  # in the background
    handle = nb.pending.runs[-1].handle
    wait_until(lambda: handle.state == State.STARTED, 20, "the cell to start")
    ip.run_line_magic("unload_ext", "nbtask")
    assert handle.done()
    reader = App("reader", settings=settings)
    try:  # the cell ended on the worker (or, not cancelled, would have kept x by then)
        wait_until(lambda: not any(i.busy for i in reader.workers().values()), 20, "idle")
    finally:
        reader.close()
    assert nothing_held(settings)


def test_a_value_released_with_its_session_is_refused_when_sent_again(
    ip: InteractiveShell, nb: Session
) -> None:
    task(ip, MAKE_X)
    ip.run_line_magic("unload_ext", "nbtask")
    ip.run_line_magic("load_ext", "nbtask")
    released = r"^x was released when its nbtask session ended .* Run Cell In\[\d+\] again"
    with pytest.raises(CellError, match=released + r" to make it. Nothing was sent$"):
        task(ip, "total = float(x.sum())")
    session = session_of(ip)
    assert session is not None and session.pending.runs == []

    @session.app.task
    def total(values: Any) -> float:
        return float(values.sum())

    with pytest.raises(BlobError, match=released):
        total.delay([ip.user_ns["x"]])


def test_connecting_to_another_broker_releases_what_the_notebook_kept(
    ip: InteractiveShell, nb: Session, settings: Settings
) -> None:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    ip.run_line_magic("nbtask", f"connect {settings.broker_url}")  # the same store: kept
    assert kept.fetch()[1] == 1.0
    other = (settings.broker_url or "").rsplit("/", 1)[0] + "/1"
    try:
        ip.run_line_magic("nbtask", f"connect {other}")
        wait_until(lambda: nothing_held(settings), 20, "the old store and holder to let x go")
        moved = "x was released when the notebook connected to another broker"
        with pytest.raises(BlobError, match=moved):
            kept.fetch()
    finally:
        client = redis.Redis.from_url(other)
        client.delete(*client.keys(f"{settings.key_prefix}:*"), "-")
        client.close()
