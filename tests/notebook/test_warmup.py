"""Worker processes make ready for cells once a notebook session uses their worker.

A worker process makes the IPython shell that runs cells, and imports the modules whose
settings a notebook ships with each cell (numpy's here), on first use: half a second or
more that the first cell would wait for. A session says in the store that it uses the
workers; each idle process sees it and makes ready, running no task. Real worker
processes on the real brokers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable

import numpy  # noqa: F401 - the notebook's settings include numpy's (its random state)
import pytest
from helpers import broker_env, wait_until
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import App, Settings
from nbtask.notebook.magics import session_of

pytestmark = pytest.mark.brokers

#: A module no notebook setting needs: one a note written by someone else may name.
OTHER = "poplib"
NOTHING_MADE = {"shell": False, "numpy": False, OTHER: False}
MADE = {"shell": True, "numpy": True, OTHER: False}
StartWorker = Callable[..., WorkerProcess]


class _Made:
    """What the worker process running it has made ready for cells so far (a task)."""

    def __init__(self, app: App) -> None:
        @app.task
        def made() -> dict[str, bool]:
            import sys

            shell = getattr(sys.modules.get("nbtask.notebook.worker_shell"), "_SHELL", None)
            found = {name: name in sys.modules for name in ("numpy", "poplib")}
            return {"shell": shell is not None, **found}

        self.task = made
        self.sent: list[str] = []  # the ids of those sent, the only tasks the worker runs

    def __call__(self) -> dict[str, bool]:
        handle = self.task.delay()
        self.sent.append(handle.id[:8])
        result: dict[str, bool] = handle.get(timeout=30)
        return result


def _made(app: App) -> _Made:
    return _Made(app)


def _made_soon(made: _Made) -> None:
    def ready() -> bool:
        time.sleep(1.5)  # idle a while: an idle process makes ready
        return made()["shell"]

    wait_until(ready, 30, "the worker process to make ready for cells")
    assert made() == MADE


def test_a_session_has_each_worker_process_make_ready_for_cells_a_replacement_too(
    ip: InteractiveShell,
    settings: Settings,
    app: App,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = start_worker(concurrency=1)
    made = _made(app)
    time.sleep(1.5)  # idle a while: a worker no notebook uses stays small
    assert made() == NOTHING_MADE
    for key, value in broker_env(settings).items():
        monkeypatch.setenv(key, value)
    ip.run_line_magic("load_ext", "nbtask")
    _made_soon(made)
    session = session_of(ip)
    assert session is not None
    # It ran no task: the last heartbeat may still list this test's own last one.
    busy = re.findall(r"busy \d+ \(([^)]*)\)", session.status())
    assert all(running in made.sent for ids in busy for running in ids.split(", ")), busy
    (child,) = worker.children()
    os.kill(child.pid, signal.SIGKILL)  # its replacement starts with nothing made
    replaced = lambda: [c.pid for c in worker.children()] not in ([], [child.pid])  # noqa: E731
    wait_until(replaced, 30, "a new child")
    _made_soon(made)


def test_a_note_written_by_someone_else_imports_no_module_notebooks_do_not_ship(
    access: RawBroker, app: App, start_worker: StartWorker
) -> None:
    start_worker(concurrency=1)
    made = _made(app)
    note = f"{access.settings.key_prefix}:notebooks"
    access.store.set(note, json.dumps(["numpy", OTHER, 5]))  # write access, no secret
    _made_soon(made)  # numpy, whose settings notebooks ship; never OTHER
