"""Interrupting a running task (a terminate, a soft time limit), never inside an import.

An exception raised into Python code that is importing a module cuts the import in half:
the module leaves ``sys.modules`` but the submodules it had imported stay, bound to a
module that no longer exists, and what they registered stays registered. The package is
then broken for every later task of the process (pandas says an option "has already been
registered", matplotlib has no ``get_data_path``). So an interrupt that finds the task
inside an import waits for the import to end; a task stuck there is still killed when the
terminate's grace is over.

A process that task code forks (``os.fork``, ``multiprocessing``'s ``fork``) is not the
task: it starts with Python's own handlers for these signals, as any Python process, so
SIGINT there raises a plain ``KeyboardInterrupt`` in that process and SIGALRM ends it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from contextlib import suppress
from types import FrameType

from nbtask.errors import SoftTimeLimitExceeded

__all__ = ["TaskInterrupts", "importing"]

#: How often an interrupt that waits for an import looks again whether it has ended.
RECHECK_SECONDS = 0.02

_IMPORT_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
# Sent by the process to its own main thread to look again; a task gets no other use of it.
_RECHECK_SIGNAL = signal.SIGUSR1


def importing(frame: FrameType | None) -> bool:
    """True if ``frame`` or a frame that called it runs the import machinery."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_FILES:
            return True
        frame = frame.f_back
    return False


class TaskInterrupts:
    """The child's signal handlers: SIGINT terminates the task, SIGALRM is its soft limit.

    Either raises in the task's code only while it runs (:meth:`running`); one that comes
    while the task is being set up is remembered in :attr:`terminated`.
    """

    def __init__(self) -> None:
        self.terminated = False
        self._running = False
        self._run = 0  # which run a waiting interrupt is for: never raised in a later one
        self._waiting: tuple[int, Callable[[], BaseException]] | None = None

    def install(self) -> None:
        """Install the handlers (in the process's main thread)."""
        signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.signal(_RECHECK_SIGNAL, self._on_recheck)
        os.register_at_fork(after_in_child=_python_defaults)

    def begin(self) -> None:
        """A new delivery: no terminate has come for it yet."""
        self.terminated = False

    def start(self) -> None:
        """The task's own code starts; raise now if a terminate came before it."""
        self._run += 1
        self._waiting = None
        self._running = True
        if self.terminated:
            self._running = False
            raise _terminate()

    def stop(self) -> None:
        """The task's own code has ended (either way): interrupts raise no more."""
        self._running = False
        self._waiting = None

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        # Only the supervisor sends SIGINT: terminate the task this slot holds. If it has
        # not started running yet, it never will (see start()).
        self.terminated = True
        self._raise(_terminate, frame)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        self._raise(_soft_limit, frame)

    def _on_recheck(self, signum: int, frame: FrameType | None) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and waiting[0] == self._run:
            self._raise(waiting[1], frame)

    def _raise(self, make: Callable[[], BaseException], frame: FrameType | None) -> None:
        if not self._running:
            return
        if importing(frame):
            self._waiting = (self._run, make)
            recheck = threading.Timer(
                RECHECK_SECONDS,
                signal.pthread_kill,
                (threading.main_thread().ident, _RECHECK_SIGNAL),
            )
            recheck.daemon = True
            recheck.start()
            return
        raise make()


def _python_defaults() -> None:
    """In a process forked from the child: the handlers a Python process starts with."""
    with suppress(ValueError):  # (only the main thread sets handlers)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.signal(_RECHECK_SIGNAL, signal.SIG_DFL)


def _terminate() -> BaseException:
    return KeyboardInterrupt("task terminated (revoked)")


def _soft_limit() -> BaseException:
    return SoftTimeLimitExceeded("the task ran past its soft time limit")
