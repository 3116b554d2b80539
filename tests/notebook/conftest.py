"""Fixtures of the notebook tests: a real IPython shell with the extension loaded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import broker_env
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython

from nbtask import Settings
from nbtask.notebook.magics import session_of
from nbtask.notebook.session import Session


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = start_ipython() or InteractiveShell.instance()  # the one global test shell
    before = set(shell.user_ns)
    yield shell
    shell.run_line_magic("unload_ext", "nbtask")
    for name in set(shell.user_ns) - before:
        shell.user_ns.pop(name, None)


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
