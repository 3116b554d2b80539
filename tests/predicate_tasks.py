"""Tasks raising Celery's ``Reject`` and ``Ignore`` (``-A tests.predicate_tasks``).

Each notes its runs and its handlers' calls, a line each, in the file named by its first
argument, for the test to read from the client.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nbtask import App, Ignore, Reject

app = App("predicate-tasks", insecure=True)


def note(path: str, what: str) -> None:
    """Append ``what`` as a line of ``path``."""
    with Path(path).open("a") as out:
        out.write(what + "\n")


def notes(path: str | Path) -> list[str]:
    """The lines :func:`note` wrote."""
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


class Noted(app.Task):
    """Notes each call of its failure and return handlers."""

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        note(args[0], "on_failure")

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        note(args[3][0], "after_return")


@app.task(base=Noted, acks_late=True)
def ignored(path: str) -> None:
    """Ignored after a print."""
    note(path, "run")
    print("ran, then ignored")
    raise Ignore()


@app.task
def ignored_at_once() -> None:
    """Ignored before it sent anything: no output, no state of its own."""
    raise Ignore()


@app.task(base=Noted, acks_late=True, autoretry_for=(Exception,), max_retries=3)
def rejected(path: str) -> None:
    """Rejected without requeue (and would be retried, were it a failure)."""
    note(path, "run")
    raise Reject("bad input", requeue=False)


@app.task(base=Noted, acks_late=True)
def rejects_once(path: str) -> int:
    """Rejected with requeue on its first run; returns the number of runs on the next."""
    note(path, "run")
    runs = notes(path).count("run")
    if runs == 1:
        raise Reject("not yet", requeue=True)
    return runs


@app.task(base=Noted)
def rejects_always(path: str) -> None:
    """Rejected with requeue every time."""
    note(path, "run")
    raise Reject("never", requeue=True)


@app.task(acks_late=True)
def rejects_once_told(path: str, go: str) -> None:
    """Rejected with requeue every time, once the file ``go`` exists (at most 30 s on)."""
    note(path, "run")
    end = time.monotonic() + 30
    while not Path(go).exists() and time.monotonic() < end:
        time.sleep(0.05)
    raise Reject("told to", requeue=True)
