"""A kernel killed sends no release: its kept values leave their holder's memory all the same.

Once no live session names a value, and no work used it for ``result_ttl`` (in which a
restarted kernel can still re-attach to it), its holder drops it, saying so in one line of
the worker's log. A live session's values stay, however long it sits idle. Real kernels
(killed with SIGKILL), a real IPython shell and real worker processes, with ``result_ttl``
lowered to 4 s so that the holder looks every second.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import redis
from helpers import cell_task as task
from helpers import held_values, kernel_env, kernel_runner, wait_until
from IPython.core.interactiveshell import InteractiveShell
from worker_process import WorkerProcess

from nbtask import App, Settings
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session

StartWorker = Callable[..., WorkerProcess]
Kernel = Callable[[dict[str, str]], tuple[Any, Any]]
MAKE_X = "import numpy as np\nx = np.arange(300_000.0)"
#: Other bytes (the same would be held once, under one key, for both names).
MAKE_Y = "import numpy as np\ny = np.arange(300_000.0) + 1"
TOTAL = float(sum(range(300_000)))
#: Binds ``s``, the kernel's nbtask session, in a kernel that loaded nbtask.
SESSION = "from nbtask.notebook.magics import session_of\ns = session_of(get_ipython())"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Names of 1 MiB or more are kept; records, store copies and marks last 10 s.

    Long enough for a second kernel to start and re-attach before the first's records
    expire, on a busy machine too.
    """
    return settings.replace(keep_threshold=1024 * 1024, result_ttl=10.0)


def held(app: App) -> set[str]:
    """The names of the kept values the live worker processes hold."""
    return {value.name for value in held_values(app)}


def blob_keys(settings: Settings) -> list[bytes]:
    """The test's store copies (their chunks)."""
    client = redis.Redis.from_url(settings.result_url or settings.broker_url or "")
    try:
        return list(client.scan_iter(match=f"{settings.key_prefix}:blob:*", count=1000))
    finally:
        client.close()


def start_kernel(kernel: Kernel, settings: Settings) -> tuple[Any, Callable[[str], str]]:
    """A kernel with the extension loaded; and what runs code there, returning its output."""
    km, client = kernel(kernel_env(settings))
    return km, kernel_runner(client)


def kill(km: Any) -> None:
    """SIGKILL the kernel, as the OOM killer does: it ends its session in no way."""
    process = km.provisioner.process
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.brokers()
def test_a_killed_kernels_kept_value_leaves_its_holders_memory_saying_so(
    settings: Settings, start_worker: StartWorker, kernel: Kernel, app: App
) -> None:
    worker = start_worker(concurrency=1)
    km, run = start_kernel(kernel, settings)
    run(f"%%task --wait --keep x\n{MAKE_X}")
    assert held(app) == {"x"}
    kill(km)
    # Before: held for ever (only the spill past worker_memory_budget dropped it).
    wait_until(lambda: not held(app), 120, "the holder to drop x")

    # The holder announces what it holds as it drops x, then logs why: read the log after.
    def said_dropped() -> list[str]:
        return [line for line in worker.log.read_text().splitlines() if "dropped x (" in line]

    wait_until(lambda: bool(said_dropped()), 10, "the holder to log why it dropped x")
    said = said_dropped()
    assert len(said) == 1, said
    assert "no live notebook session has named it for result_ttl (10 s)" in said[0], said


def test_an_idle_live_sessions_kept_value_stays_held_past_result_ttl(
    ip: InteractiveShell,
    loaded: Session,
    settings: Settings,
    start_worker: StartWorker,
    kernel: Kernel,
    app: App,
) -> None:
    """The shell's session keeps ``x`` in a background cell, then sits idle: no cell even
    takes ``x`` into the notebook. A killed kernel's ``y``, held on the same process after
    ``x``, shows when the holder has looked past ``x``'s window."""
    start_worker(concurrency=1)
    task(ip, MAKE_X, "")
    wait_until(loaded.pending.runs[-1].handle.done, 30, "the cell that keeps x to end")
    km, run = start_kernel(kernel, settings)
    run(f"%%task --wait --keep y\n{MAKE_Y}")
    kill(km)
    wait_until(lambda: "y" not in held(app), 120, "the holder to drop the killed kernel's y")
    assert held(app) == {"x"}
    wait_until(lambda: not blob_keys(settings), 60, "the store copies to expire")
    task(ip, "total = float(x.sum())")  # on its holder: no store copy left to read
    assert ip.user_ns["total"] == TOTAL
    assert isinstance(ip.user_ns["x"], RemoteValue)


def test_a_value_a_restarted_kernel_reattached_stays_held_while_it_lives(
    settings: Settings, start_worker: StartWorker, kernel: Kernel, app: App
) -> None:
    """The killed kernel kept ``x`` and ``z``; the kernel after it re-attaches the cell of
    ``x`` alone (``app.handle(id).get()``, within ``result_ttl``): ``z`` goes, ``x`` stays."""
    start_worker(concurrency=1)
    km, run = start_kernel(kernel, settings)
    run(SESSION)
    run(f"%%task --wait --keep x\n{MAKE_X}")
    task_id = run("print(s.pending.runs[-1].handle.id)").strip()
    run(f"%%task --wait --keep z\n{MAKE_Y.replace('y =', 'z =')}")
    _, again = start_kernel(kernel, settings)  # started first: it re-attaches at once
    again(SESSION)
    kill(km)
    again(f"values = s.app.handle({task_id!r}).get()\nassert type(x).__name__ == 'RemoteValue'")
    wait_until(lambda: "z" not in held(app), 120, "the holder to drop z, which no one re-attached")
    assert held(app) == {"x"}
    assert again("print([v.name for v in s.releases.values()])").strip() == "['x']"
    assert "300000" in again("%%task --wait\nprint(len(x))")  # on its holder


def test_a_kept_value_read_through_a_reattached_cells_handle_is_the_notebooks_own(
    settings: Settings, start_worker: StartWorker, kernel: Kernel
) -> None:
    """A restarted kernel re-attaches the killed one's cell (``app.handle(id)``): its
    ``get()["x"]`` is ``x``, fetched and bound as a cell reading ``x`` has it."""
    start_worker(concurrency=1)
    km, run = start_kernel(kernel, settings)
    run(SESSION)
    run(f"%%task --wait\n{MAKE_X}")
    task_id = run("print(s.pending.runs[-1].handle.id)").strip()
    _, again = start_kernel(kernel, settings)  # started first: it re-attaches at once
    again(SESSION)
    kill(km)
    read = f"h = s.app.handle({task_id!r})\nprint(h.get()['x'][:3].tolist(), h.get()['x'] is x)"
    assert "[0.0, 1.0, 2.0] True" in again(read)
