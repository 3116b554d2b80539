"""Fixtures of the notebook tests: a real IPython shell, or kernel, with the extension loaded."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, broker_env, kernel_env, kernel_runner
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from jupyter_client.manager import KernelManager

from nbtask import Settings
from nbtask.notebook import process_state
from nbtask.notebook.magics import session_of
from nbtask.notebook.session import Session


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = start_ipython() or InteractiveShell.instance()  # the one global test shell
    # The output history starts afresh: an earlier test of this process may have left
    # values of a session since ended in `Out` (which a cell reading `Out` ships), or
    # `_` bound apart from the display hook (IPython then stops updating it for good).
    shell.history_manager.output_hist.clear()
    for name in ("_", "__", "___"):
        shell.user_ns.pop(name, None)
        setattr(shell.displayhook, name, "")
    before = set(shell.user_ns)
    # A cell's logging setup comes back to this process, as to a kernel: put back after.
    loggers = [logging.root, *logging.root.manager.loggerDict.values()]
    setups = [
        (lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers if hasattr(lg, "handlers")
    ]
    yield shell
    shell.run_line_magic("unload_ext", "nbtask")
    for name in set(shell.user_ns) - before:
        shell.user_ns.pop(name, None)
    for logger, level, propagate, handlers in setups:
        logger.setLevel(level)
        logger.propagate, logger.handlers = propagate, handlers


@pytest.fixture
def kernel() -> Iterator[Callable[[dict[str, str]], tuple[Any, Any]]]:
    """Start kernels with a given environment; all shut down after the test."""
    started: list[tuple[Any, Any]] = []
    folders: list[Path] = []

    def start(env: dict[str, str]) -> tuple[Any, Any]:
        # IPC sockets in a folder of their own: under pytest-xdist another process starts
        # kernels too, and the default names (kernel-ipc-N in the cwd) would collide.
        folders.append(Path(tempfile.mkdtemp(prefix="nbtask-kernel-")))
        sockets = folders[-1] / "kernel"
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(sockets))
        km.start_kernel(env=env, cwd=str(ROOT))
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=30)
        started.append((km, client))
        return km, client

    yield start
    for km, client in started:
        client.stop_channels()
        km.shutdown_kernel(now=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def restored() -> Iterator[None]:
    """This process's process-wide state (``process_state``) put back after the test."""
    state = process_state.capture()
    yield
    process_state.apply(state)


@pytest.fixture
def loaded(ip: InteractiveShell, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Session:
    """The extension loaded against the test's broker; no workers started."""
    for key, value in broker_env(settings).items():
        monkeypatch.setenv(key, value)
    ip.run_line_magic("load_ext", "nbtask")
    session = session_of(ip)
    assert session is not None
    return session


@pytest.fixture
def nb(loaded: Session, start_worker: Any) -> Session:
    """A shell with the extension loaded against the real Redis and two worker processes."""
    start_worker()
    return loaded


@pytest.fixture
def run_in_kernel(settings: Settings, start_worker: Any, kernel: Any) -> Callable[[str], str]:
    """Run code in a kernel with the extension loaded and two worker processes.

    It returns what the code printed (stdout and stderr), and fails on an error.
    """
    start_worker()
    return kernel_runner(kernel(kernel_env(settings))[1])
