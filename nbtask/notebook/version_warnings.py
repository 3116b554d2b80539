"""Warnings that the workers of a queue run another version of a package a cell uses.

A value pickled with one version of a package may not load the same with another. Each
``%%task`` cell is checked against the workers of its queue; each package (and Python
itself) is named once per version found on the workers.

A cell is checked without a broker round trip in the usual case: the workers are those of
the registry as the app last read it (at most a few seconds ago, as sending goes by), and
a worker's versions, announced once when it starts, are read once per worker.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from nbtask._text import printable
from nbtask.client.app import App
from nbtask.notebook.module_code import module_name_of
from nbtask.wire.versions import PYTHON, version_of

__all__ = ["VersionWarnings", "modules_used"]


def modules_used(imports: Iterable[str], values: Iterable[Any]) -> set[str]:
    """The top-level packages a cell imports or whose values it ships, and Python.

    The standard library is left out: its version is Python's.
    """
    modules = {PYTHON, *imports, *map(module_name_of, values)}
    tops = {m.split(".")[0] for m in modules}
    return {m for m in tops if m not in sys.stdlib_module_names and m != "__main__"}


class VersionWarnings:
    """Warns, once per package and version, of another version on a queue's workers."""

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()  # (package, worker version) warned about
        #: What each worker announced, by package (``None``: it has not that package).
        self._announced: dict[str, dict[str, str | None]] = {}

    def check(self, app: App, modules: Iterable[str], queue: str) -> None:
        """Warn on stderr of each of ``modules`` at another version on ``queue``'s workers."""
        here = {m: v for m in modules if (v := version_of(m))}
        for worker_id, info in app.workers(recent=True).items():
            if queue not in info.queues:
                continue
            for module, theirs in self._versions(app, worker_id, sorted(here)).items():
                mine = here[module]
                if _differs(module, mine, theirs) and (module, theirs) not in self._warned:
                    self._warned.add((module, theirs))
                    # Announced versions and worker ids are unsigned: shown printable.
                    print(
                        f"nbtask: {module} is {mine} here but {printable(theirs)} on worker "
                        f"{printable(worker_id)} (queue {queue}): values made with one may not "
                        "load the same in the other",
                        file=sys.stderr,
                    )

    def _versions(self, app: App, worker_id: str, modules: list[str]) -> Mapping[str, str]:
        """The versions of ``modules`` ``worker_id`` announced (those it has).

        A worker announces its versions once, when its start-up probe ends: once it has
        (its Python is among them), the answers are kept; until then it is asked again.
        """
        known = self._announced.get(worker_id, {})
        missing = [m for m in modules if m not in known]
        if missing:
            found = app.store.versions(worker_id, [PYTHON, *missing])
            if PYTHON in found:
                known.update({m: found.get(m) for m in [PYTHON, *missing]})
                self._announced[worker_id] = known
            else:
                return found
        return {m: v for m in modules if (v := known.get(m)) is not None}


def _differs(module: str, mine: str, theirs: str) -> bool:
    # Python: a patch release does not change pickles; major.minor may.
    if module == PYTHON:
        return mine.split(".")[:2] != theirs.split(".")[:2]
    return mine != theirs
