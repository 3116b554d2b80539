"""Small process helpers shared by the worker and the embedded cluster (Linux-aware)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import NamedTuple

__all__ = [
    "Place",
    "boot_id",
    "current_pid",
    "die_with_parent",
    "group_members",
    "interrupts_held",
    "pid_alive",
    "pid_is",
    "pid_namespace",
    "pid_runs",
    "pid_stopped",
    "process_started",
    "runs_here",
    "sees_pids_of",
    "sigint_handled_by",
    "start_ticks",
    "this_place",
]

_PR_SET_PDEATHSIG = 1
#: Seconds a process may seem to have started after its owner says it did and still be
#: that one (the two clocks read: /proc's boot time is whole seconds).
_CLOCK_SLACK = 2.0

# This process's id, renewed in every child ``os.fork`` makes (``multiprocessing``'s
# too): ``os.getpid()`` is a system call each time, and the broker connections ask on
# every use, so that a fork never talks on its parent's socket.
_pid = [os.getpid()]


def _renew_pid() -> None:
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def current_pid() -> int:
    """The id of the calling process, without a system call (right in a forked child too).

    A child forked outside Python (C code calling ``fork()`` and running Python on
    without exec) would keep its parent's id here: use ``os.getpid()`` there.
    """
    return _pid[0]


def die_with_parent(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux).

    Elsewhere this does nothing; the supervisor's parent-pid check still applies.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        return


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (and is not a zombie we could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_runs(pid: int) -> bool:
    """True if process ``pid`` exists and has not ended.

    A zombie (ended, not yet reaped by its parent) does not run. Where there is no
    ``/proc`` (not Linux), as :func:`pid_alive`.
    """
    if not pid_alive(pid):
        return False
    state = _state(pid)
    if state is None:
        return not Path("/proc/self/stat").exists()  # gone meanwhile, or no /proc at all
    return state not in ("Z", "X")


def pid_stopped(pid: int) -> bool:
    """True if process ``pid`` is stopped (SIGSTOP, or Ctrl-Z in its terminal; Linux)."""
    return _state(pid) == "T"


def _state(pid: int) -> str | None:
    """The state letter ``/proc`` gives process ``pid`` ("" if unreadable); ``None``: none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat.rpartition(") ")[2].split()
    return fields[0] if fields else ""


def boot_id() -> str:
    """The id the kernel drew at this boot (Linux); "" where there is none to read.

    Processes on one kernel share it (containers too); another host's, or this one's
    after a reboot, differs.
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:64]
    except OSError:
        return ""


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds, to about a clock tick), from ``/proc``.

    ``None`` if it does not exist, or where there is no ``/proc`` to read (not Linux).
    Tells a process from a later one given the same pid (:func:`start_ticks` does so
    whatever the wall clock did since).
    """
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    try:
        boot = Path("/proc/stat").read_text()
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    booted = next((line.split()[1] for line in boot.splitlines() if line.startswith("btime ")), "")
    try:
        return int(booted) + ticks / per_second
    except (ValueError, ZeroDivisionError):
        return None


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since its host booted (``/proc``).

    ``None`` if it does not exist, or where there is no ``/proc`` to read (not Linux).
    Unlike :func:`process_started`, not moved by a step of the wall clock (NTP after a
    resume): a process and a later one given its pid never share it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (name) state ...": the name may hold spaces and parentheses; starttime is the
    # 22nd field, the 20th after the name.
    fields = stat.rpartition(") ")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[tuple[int, str]] | None:
    """The live processes of process group ``pgid``, with their names (Linux).

    Zombies are left out (they have exited), and reaped when they are this process's
    (it is PID 1 in a container, or the processes' parent died). ``None`` where there is
    no ``/proc`` to read: the caller can still signal the group as a whole.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile, or not readable
            continue
        # "pid (name) state ppid pgrp ...": the name may hold spaces and parentheses.
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        fields = rest.split()
        if len(fields) < 3 or int(fields[2]) != pgid:
            continue
        pid = int(entry.name)
        if fields[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            continue
        members.append((pid, name))
    return sorted(members)


@contextlib.contextmanager
def sigint_handled_by(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Run the block with ``handler`` for ``SIGINT`` (Ctrl-C), then put the previous back.

    Signals reach only the main thread; elsewhere, and under a handler set outside Python
    (``None``, which could not be put back), the handler is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is None
    ):
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back Ctrl-C (``SIGINT``, a notebook's Stop) until the block ends, then deliver it.

    For steps that must not stop half done: starting a process (one started but not yet
    handed back would belong to no one) and stopping one (a second Stop must not leave it
    running). Signals reach only the main thread; elsewhere this holds back nothing.
    """
    caught: list[FrameType | None] = []
    with sigint_handled_by(lambda _signum, frame: caught.append(frame)):
        yield
    if caught:
        signal.raise_signal(signal.SIGINT)  # through the handler now in place, as it came


class Place(NamedTuple):
    """Where a process runs, as far as its pid means something: ``""`` where not known.

    Two hosts may share a name, and containers on one kernel share its boot id: the pid
    namespace tells the last apart (a pid is looked up in the looker's own).
    """

    hostname: str
    #: The id its host's kernel drew at boot (:func:`boot_id`).
    boot: str = ""
    #: Its pid namespace (:func:`pid_namespace`).
    pid_space: str = ""


def pid_namespace() -> str:
    """The pid namespace of this process (Linux), e.g. ``pid:[4026531836]``; else ``""``."""
    try:
        return os.readlink("/proc/self/ns/pid")[:64]
    except OSError:
        return ""


def this_place() -> Place:
    """Where this process runs (:class:`Place`)."""
    return Place(socket.gethostname(), boot_id(), pid_namespace())


def sees_pids_of(place: Place) -> bool:
    """True if a pid said by a process at ``place`` names the same process here.

    Its host's name must be this one's; where both sides say their boot id and pid
    namespace, those must match too (another host, a reboot, or a container of its own
    pid namespace, whose pid 1 is another process here).
    """
    here = this_place()
    return place.hostname == here.hostname and all(
        not (theirs and ours) or theirs == ours
        for theirs, ours in ((place.boot, here.boot), (place.pid_space, here.pid_space))
    )


def runs_here(place: Place, pid: int, started: float, ticks: int = 0) -> bool:
    """True if process ``pid`` of ``place`` (:func:`sees_pids_of`) runs here (:func:`pid_is`)."""
    return sees_pids_of(place) and pid_is(pid, started, ticks)


def pid_is(pid: int, started: float, ticks: int = 0) -> bool:
    """True if this host's process ``pid`` runs and is the one that registered it.

    It must run (not a zombie) and be the one that started ``ticks`` clock ticks after
    boot (:func:`start_ticks`), where that is known (non-zero); else not have started
    after ``started`` (epoch s). Either way, a later process given the pid is not taken
    for it. ``pid`` 0 or less: nothing runs (a stopped worker says so).
    """
    if pid <= 0 or not pid_runs(pid):
        return False
    if ticks:
        return start_ticks(pid) == ticks
    began = process_started(pid)
    return began is None or not started or began <= started + _CLOCK_SLACK
