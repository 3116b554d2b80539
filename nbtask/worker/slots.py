"""What each worker child is running, in memory shared with its supervisor."""

from __future__ import annotations

import ctypes
import multiprocessing

from nbtask.core.options import MAX_TASK_ID_CHARS

__all__ = ["SlotState"]

#: What a slot keeps of an id it cannot keep whole, too long or holding a NUL byte (no
#: task id is: see MAX_TASK_ID_CHARS; only a queue entry or a message not made by
#: nbtask's client names one): its start, then this mark, which no task id has. Cut
#: plainly, it could read as another task's id, and be taken for that task (terminated,
#: or failed past its time limit, in its stead).
_CUT = b"*"


class SlotState:
    """What one child is running, in memory shared with the supervisor.

    Written by the child, read by the supervisor to enforce hard time limits, to find
    the child running a task it must terminate, and to announce at once when a child that
    holds kept values starts or ends a task.
    """

    def __init__(self) -> None:
        # Every task id whole (ASCII), and the NUL ending it.
        self._task = multiprocessing.RawArray(ctypes.c_char, MAX_TASK_ID_CHARS + 1)
        self._deadline = multiprocessing.RawValue(ctypes.c_double, 0.0)
        self._holds = multiprocessing.RawValue(ctypes.c_bool, False)

    @property
    def task_id(self) -> str:
        """The running task's id, or ``""`` when idle."""
        return bytes(self._task.value).decode(errors="replace")

    @property
    def deadline(self) -> float:
        """Epoch seconds past which the supervisor kills the child (0: no limit)."""
        return float(self._deadline.value)

    @property
    def holds(self) -> bool:
        """The child has held a kept value: work on it may be sent to this child."""
        return bool(self._holds.value)

    def occupy(self, task_id: str, deadline: float) -> None:
        """Record the task now running."""
        self._deadline.value = 0.0
        raw = task_id.encode()
        if len(raw) > MAX_TASK_ID_CHARS or b"\0" in raw:
            raw = raw.split(b"\0", 1)[0][: MAX_TASK_ID_CHARS - len(_CUT)] + _CUT
        self._task.value = raw
        self._deadline.value = deadline

    def clear(self, *, holds: bool) -> None:
        """Record that the child is idle, and whether it has held a kept value."""
        self._deadline.value = 0.0
        self._task.value = b""
        self._holds.value = holds
