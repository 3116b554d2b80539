"""Waking the outbox's thread: a bell for events, and an alarm for a task's ``started``.

Waking a thread costs a context switch and a hand-over of the GIL on every task. The
``started`` event of a task that ends within a fraction of a millisecond is never sent
(its final event says when it started), so the task's thread does not ring for it: it
arms a kernel timer (Linux's ``timerfd``), which wakes the outbox's thread only if the
task is still running when it expires. Arming and disarming are a system call each, with
no thread woken. Where ``timerfd`` is missing, :class:`Alarm` is unavailable and the
outbox rings its bell at once instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import sys
from typing import Any

__all__ = ["Alarm", "Bell", "wait_for"]

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Bell:
    """A file descriptor one thread makes readable to wake another blocked on it."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._read = self._write = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:  # not Linux
            self._read, self._write = os.pipe()
            os.set_blocking(self._read, False)
            os.set_blocking(self._write, False)

    def fileno(self) -> int:
        """What to wait on (see :func:`wait_for`)."""
        return self._read

    def ring(self) -> None:
        """Make the bell readable (once is enough: rings before a :meth:`drain` add up)."""
        with contextlib.suppress(BlockingIOError):  # a full pipe is rung already
            os.write(self._write, (1).to_bytes(8, sys.byteorder))

    def drain(self) -> None:
        """Silence the bell."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 4096)


class Alarm:
    """A one-shot kernel timer whose file descriptor becomes readable when it expires."""

    def __init__(self, seconds: float) -> None:
        self._fd = -1
        libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
        if libc is None or not hasattr(libc, "timerfd_create"):
            return
        fd = int(libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC))
        if fd < 0:
            return
        self._fd, self._settime = fd, libc.timerfd_settime
        # Made once per delay: arm() and disarm() run on every task.
        self._specs: dict[float, tuple[_Itimerspec, Any]] = {}
        self._armed_ref = self._spec(seconds)
        self._off = _Itimerspec(_Timespec(0, 0), _Timespec(0, 0))
        self._off_ref = ctypes.byref(self._off)

    def _spec(self, seconds: float) -> Any:
        """The timer setting that expires once, ``seconds`` after it is set (by reference)."""
        made = self._specs.get(seconds)
        if made is None:
            # At least a nanosecond: a timer set to zero is one turned off.
            whole, nanoseconds = divmod(max(1, round(seconds * 1e9)), 10**9)
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, nanoseconds))
            made = self._specs[seconds] = (spec, ctypes.byref(spec))  # the spec kept alive
        return made[1]

    @property
    def available(self) -> bool:
        """False where the kernel has no ``timerfd`` (then nothing here does anything)."""
        return self._fd >= 0

    def fileno(self) -> int:
        """What to wait on (see :func:`wait_for`)."""
        return self._fd

    def arm(self, seconds: float | None = None) -> None:
        """Expire once, ``seconds`` (else the given seconds) from now.

        Re-arming forgets an earlier expiry.
        """
        armed = self._armed_ref if seconds is None else self._spec(seconds)
        self._settime(self._fd, 0, armed, None)

    def disarm(self) -> None:
        """Never expire (until armed again)."""
        self._settime(self._fd, 0, self._off_ref, None)

    def drain(self) -> None:
        """Take note of an expiry."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)


def wait_for(bell: Bell, alarm: Alarm, timeout: float | None) -> tuple[bool, bool]:
    """Block until the bell rings, the alarm expires or ``timeout`` passes (GIL released).

    Returns whether the bell rang and whether the alarm expired; both are drained.
    """
    fds = [bell.fileno()] + ([alarm.fileno()] if alarm.available else [])
    readable, _, _ = select.select(fds, [], [], timeout)
    rang, expired = bell.fileno() in readable, alarm.available and alarm.fileno() in readable
    if rang:
        bell.drain()
    if expired:
        alarm.drain()
    return rang, expired
