"""Small process helpers shared by the worker and the embedded cluster (Linux-aware)."""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["die_with_parent", "pid_alive"]

_PR_SET_PDEATHSIG = 1


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
