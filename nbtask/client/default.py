"""The default app of the process: in a notebook, the notebook's own."""

from __future__ import annotations

import threading

from nbtask.client.app import App

__all__ = ["default_app", "use_as_default"]

_default: App | None = None  # the one default app of this process
_default_lock = threading.Lock()


def default_app() -> App:
    """The default app of the process: in a notebook, the notebook's own.

    ``%load_ext nbtask`` uses it for ``%%task`` cells (its named cells are
    ``nbtask.app().cells``), and an ``App()`` made in the same process shares its embedded
    cluster. Made on first use (from the environment), and again after it was closed.
    """
    global _default  # noqa: PLW0603 - the one default app (DESIGN: no other global state)
    with _default_lock:
        if _default is None or _default.closed:
            _default = App("notebook")
        return _default


def use_as_default(app: App) -> None:
    """Make ``app`` the default app (``%nbtask connect`` switches the notebook to it)."""
    global _default  # noqa: PLW0603 - as above
    with _default_lock:
        _default = app
