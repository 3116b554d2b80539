"""Fixtures of the holder tests: kept values stay live in the worker process that made
them, and later cells go there.

A real IPython shell against the real brokers and worker processes, with
``keep_threshold`` lowered to 1 MiB so that a 2.4 MB array is kept. Blob keys are deleted
from the store to show where a value came from: a cell that still works read none.
"""

from __future__ import annotations

import pytest

from nbtask import Settings
from nbtask.notebook.session import Session


@pytest.fixture
def move_bytes() -> int:
    """The notebook's ``move_bytes``: the default, unless a test parametrizes its own."""
    return Settings().move_bytes


@pytest.fixture
def settings(settings: Settings, move_bytes: int) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024, move_bytes=move_bytes)


@pytest.fixture
def shell(loaded: Session) -> Session:
    """The extension loaded against the test's broker; each test starts its own workers."""
    return loaded
