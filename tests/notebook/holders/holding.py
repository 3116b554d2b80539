"""What the holder tests share: a kept ``x``, finding its holder, and keeping that busy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis
from helpers import cell_task as task
from helpers import wait_until
from IPython.core.interactiveshell import InteractiveShell
from worker_process import WorkerProcess

from nbtask import Settings, TaskHandle
from nbtask.core.holding import holder_queue
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session
from nbtask.wire.events import State

MAKE_X = "import numpy as np\nx = np.arange(300_000.0)"
TOTAL = float(np.arange(300_000.0).sum())
StartWorker = Callable[..., WorkerProcess]


#: ``x`` (2.4 MB) is too large to move: work on it waits for its holder, busy or not.
X_STAYS = pytest.mark.parametrize("move_bytes", [1024 * 1024], ids=["x-over-move_bytes"])


def keep_x(ip: InteractiveShell) -> RemoteValue:
    task(ip, MAKE_X)
    kept = ip.user_ns["x"]
    assert isinstance(kept, RemoteValue) and kept.holder is not None
    return kept


def delete_store_copies(settings: Settings) -> None:
    """Delete every blob of the test's prefix: what is still usable is held in memory."""
    client = redis.Redis.from_url(settings.result_url or settings.broker_url or "")
    keys = list(client.scan_iter(match=f"{settings.key_prefix}:blob:*", count=1000))
    assert keys, "no store copy was made"
    client.delete(*keys)
    client.close()


def holder_of(session: Session, kept: RemoteValue, workers: list[WorkerProcess]) -> Any:
    """The worker (of ``workers``) and the pid of the process that holds ``kept``."""
    for info in session.app.workers().values():
        for slot, consumer in enumerate(info.consumers):
            if holder_queue(consumer) == kept.holder:
                worker = next(w for w in workers if w.pid == info.pid)
                return worker, info.pids[slot]
    raise AssertionError(f"no live worker process serves {kept.holder}")


def read(ip: InteractiveShell, name: str) -> Any:
    """``name`` as a local cell reads it (a name a cell still sends back is waited for)."""
    ip.run_cell(f"_read = {name}", store_history=True).raise_error()
    return ip.user_ns["_read"]


BUSY_FOR_2S = "import time\ntime.sleep(2)\nhead = float(x[1])"


def queue_behind_busy_holder(
    ip: InteractiveShell, shell: Session, workers: list[WorkerProcess], busy_cell: str = BUSY_FOR_2S
) -> tuple[WorkerProcess, TaskHandle, TaskHandle]:
    """Keep ``x``, keep its holder's one process busy (``busy_cell``), queue a cell behind.

    Returns the holder's worker, the busy cell's handle and the queued cell's.
    """
    kept = keep_x(ip)
    holder, _ = holder_of(shell, kept, workers)
    task(ip, busy_cell, "--out busy")
    busy = ip.user_ns["busy"]
    wait_until(lambda: busy.state is not State.PENDING, 20, "the holder to start the first cell")
    task(ip, "total = float(x.sum())", "--out queued")
    queued = ip.user_ns["queued"]
    assert queued.queue == kept.holder and queued.state is State.PENDING
    return holder, busy, queued


HOLD_UNTIL_GATE = (
    "import os, time\nwhile not os.path.exists(gate):\n    time.sleep(0.05)\nhead = float(x[1])"
)


def running_on(session: Session, holder: str) -> str | None:
    """The task the registry says the process serving ``holder`` runs ("" when idle)."""
    for info in session.app.workers().values():
        for consumer, task_id in zip(info.consumers, info.running, strict=False):
            if holder_queue(consumer) == holder:
                return task_id
    return None
