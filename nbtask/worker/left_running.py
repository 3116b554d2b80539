"""What tasks left running in the process groups of a worker's children, and ending it.

Each child leads a process group of its own (its id is the child's pid), and whatever a
task starts (a ``subprocess``, a ``multiprocessing`` or ``os.fork`` copy) joins it unless
it makes a session of its own. When a child ends, that group can outlive it. What is in it
is ended the same way every time: SIGTERM to the group, SIGKILL to what is still there
``LEFT_RUNNING_SECONDS`` later, and one log line naming the processes. When the child is
killed (hard time limit, terminate) or dies and is replaced, that happens at once, while
the worker serves on (:meth:`LeftRunning.end_soon`, finished by :meth:`LeftRunning.tick`);
what the children leave as the worker stops is ended as it stops
(:meth:`LeftRunning.end_all`).

A group's id is kept from reuse only while the group has a process: an empty group is
forgotten at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import suppress
from typing import NamedTuple

from nbtask._process import group_members

__all__ = ["LEFT_RUNNING_SECONDS", "LeftRunning"]

log = logging.getLogger("nbtask.worker")

#: How long what tasks left running has after SIGTERM before SIGKILL.
LEFT_RUNNING_SECONDS = 3.0
_POLL_SECONDS = 0.1


class _Ending(NamedTuple):
    """A group sent SIGTERM while the worker serves on."""

    kill_at: float  # time.monotonic() at which what is left gets SIGKILL
    named: list[tuple[int, str]]  # its processes when SIGTERM was sent
    task_id: str  # the task whose child led the group ("" if none ran)


class LeftRunning:
    """The process groups of ended children that still have processes."""

    def __init__(self) -> None:
        # Groups left as they are until the worker stops.
        self._kept: set[int] = set()
        # Groups being ended now, by group id.
        self._ending: dict[int, _Ending] = {}

    def keep(self, group: int) -> None:
        """Leave ``group`` (of a child that ended) until :meth:`end_all`, if it has any."""
        if _group_exists(group):
            self._kept.add(group)

    def end_soon(self, group: int, task_id: str) -> None:
        """Send ``group`` SIGTERM now; :meth:`tick` sends SIGKILL to what ignores it.

        ``task_id`` names the task whose child led the group, in the log line.
        """
        named = _members(group)
        if not named:
            return
        self._kept.discard(group)
        _signal_groups([group], signal.SIGTERM)
        self._ending[group] = _Ending(time.monotonic() + LEFT_RUNNING_SECONDS, named, task_id)

    def tick(self) -> None:
        """Forget empty groups; SIGKILL what is left of groups ended past their time."""
        self._kept = {group for group in self._kept if _group_exists(group)}
        now = time.monotonic()
        for group, ending in list(self._ending.items()):
            left = _members(group)
            if left and now < ending.kill_at:
                continue
            del self._ending[group]
            killed = {pid for pid, _ in left}
            _signal_groups([group] if left else [], signal.SIGKILL)
            whose = f"task {ending.task_id}" if ending.task_id else "a task"
            _say(whose, _union(ending.named, left), killed)

    def end_all(self) -> None:
        """End every group left, and wait for it: SIGTERM, then SIGKILL after the grace.

        For a worker that stops: its children have exited.
        """
        groups = sorted(self._kept | set(self._ending))
        earlier = [member for ending in self._ending.values() for member in ending.named]
        self._kept, self._ending = set(), {}
        named = _union(earlier, [member for group in groups for member in _members(group)])
        if not named:
            return
        _signal_groups(groups, signal.SIGTERM)
        until = time.monotonic() + LEFT_RUNNING_SECONDS
        while (stubborn := [g for g in groups if _members(g)]) and time.monotonic() < until:
            time.sleep(_POLL_SECONDS)
        killed = {pid for group in stubborn for pid, _ in _members(group)}
        _signal_groups(stubborn, signal.SIGKILL)
        _say("tasks", named, killed)


def _say(whose: str, named: list[tuple[int, str]], killed: set[int]) -> None:
    log.warning(
        "ended %d process(es) that %s left running: %s",
        len(named),
        whose,
        ", ".join(f"{pid} ({name}{', SIGKILL' if pid in killed else ''})" for pid, name in named),
    )


def _union(first: list[tuple[int, str]], then: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The processes of both lists, each once, by pid."""
    return sorted(dict([*then, *first]).items())


def _group_exists(group: int) -> bool:
    """Whether process group ``group`` has a process (a zombie counts: it keeps the id)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _members(group: int) -> list[tuple[int, str]]:
    """The live processes of ``group`` with their names (zombies do not count).

    Without ``/proc`` to read, the group as a whole, named by its id, while it has any.
    """
    members = group_members(group)
    if members is None:
        return [(group, "process group")] if _group_exists(group) else []
    return members


def _signal_groups(groups: list[int], signum: int) -> None:
    for group in groups:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)
