"""Celery's names on the :class:`~nbtask.App` that nbtask answers: ``app.control``, ``app.conf``.

``app.control.revoke(id)`` is :meth:`nbtask.App.revoke`; the rest of Celery's remote
control, and Celery's ``app.conf``, raise one error saying what nbtask offers instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn, Protocol

__all__ = ["NO_CONF", "Control"]

#: Why ``app.conf`` does not exist, and where nbtask's settings are.
NO_CONF = (
    "app.conf is Celery's: nbtask is configured with App(...) keyword arguments or NBTASK_* "
    "environment variables (see nbtask.Settings: App(result_ttl=600), "
    "NBTASK_RESULT_TTL=600); app.settings shows the app's settings, read-only"
)


class Revoker(Protocol):
    """What :class:`Control` revokes through (an :class:`~nbtask.App`)."""

    def revoke(
        self,
        task_id: str,
        *,
        terminate: bool = False,
        grace: float = 5.0,
        signal: str | int = "SIGTERM",
    ) -> bool:
        """Revoke a task; see :meth:`nbtask.App.revoke`."""


class Control:
    """Celery's ``app.control``, as far as nbtask has it: :meth:`revoke`.

    Parameters
    ----------
    app
        The app whose tasks it revokes.
    """

    def __init__(self, app: Revoker) -> None:
        self._app = app

    def revoke(
        self,
        task_id: str | Sequence[str],
        *,
        terminate: bool = False,
        grace: float = 5.0,
        signal: str | int = "SIGTERM",
    ) -> bool:
        """Revoke a task, or each of a list of tasks: :meth:`nbtask.App.revoke`.

        Returns
        -------
        bool
            Whether any of them was revoked before it started or sent a terminate request.
        """
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        revoked = [
            self._app.revoke(one, terminate=terminate, grace=grace, signal=signal) for one in ids
        ]
        return any(revoked)

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):  # copy, pickle and friends look for these
            raise AttributeError(name)
        raise AttributeError(
            f"app.control.{name} is Celery's; nbtask's app.control has only revoke(). "
            "Instead: app.workers() lists the live workers and what each runs, "
            "app.purge(queues) empties queues, app.revoke(id, terminate=True) stops a task"
        )
