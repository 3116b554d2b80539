"""A large kept value held live is sealed: its hash is off the cell's path, its checks stay.

Over ``LATER_BYTES`` (40 MB here), a value a worker process holds has its store copy
written after the cell ended, its blobs named by id and sealed by the writer
(:mod:`nbtask.wire.blobs`). Work on it still knows whether it changed (by its key by
content, which the writer learns), and a copy loaded elsewhere is checked against its
seals. A real IPython shell against the real brokers and worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell
from worker_process import WorkerProcess

from nbtask import Settings
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.session import Session

pytestmark = pytest.mark.brokers()

MAKE_BIG = "import numpy as np\nbig = np.arange(5_000_000.0)"
TOTAL = float(np.arange(5_000_000.0).sum())
StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, keeping names of 1 MiB or more on the workers."""
    return settings.replace(keep_threshold=1024 * 1024)


@pytest.fixture
def shell(loaded: Session) -> Session:
    """The extension loaded against the test's broker; each test starts its own workers."""
    return loaded


def keep_big(ip: InteractiveShell) -> RemoteValue:
    task(ip, MAKE_BIG)
    kept = ip.user_ns["big"]
    assert isinstance(kept, RemoteValue) and kept.holder is not None
    assert kept.sealed, "a large value held live was hashed on the cell's path"
    return kept


def delete_store_copies(settings: Settings) -> None:
    """Delete every blob of the test's prefix: what is still usable is held in memory."""
    client = redis.Redis.from_url(settings.result_url or settings.broker_url or "")
    keys = list(client.scan_iter(match=f"{settings.key_prefix}:blob:*", count=1000))
    if keys:  # in shared memory (one host) there are none in Redis
        client.delete(*keys)
    client.close()


def test_a_sealed_value_read_by_cells_and_tasks_stays_held_and_is_not_sent_back(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, settings: Settings
) -> None:
    start_worker(concurrency=1)
    kept = keep_big(ip)
    task(ip, "total = float(big.sum())")
    assert ip.user_ns["total"] == TOTAL
    assert ip.user_ns["big"] is kept, "a cell that only read the value sent it back"

    @shell.app.task
    def first(values: Any) -> float:
        return float(values[1])

    assert first.delay(kept).get(timeout=30) == 1.0  # the task got the live object
    delete_store_copies(settings)
    task(ip, "again = float(big[2])")  # still held, unchanged: no blob is read
    assert ip.user_ns["again"] == 2.0
    assert ip.user_ns["big"] is kept


def test_a_sealed_value_changed_in_place_is_kept_again_and_its_copy_read_checked(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker
) -> None:
    start_worker(concurrency=1)
    kept = keep_big(ip)

    @shell.app.task
    def double_in_place(values: Any) -> float:
        values *= 2
        return float(values[1])

    assert double_in_place.delay(kept).get(timeout=30) == 2.0
    # The holder sees the change and loads the sealed store copy, checking its seal.
    task(ip, "second = float(big[1])")
    assert ip.user_ns["second"] == 1.0
    task(ip, "big[0] = -1.0")  # changed by a cell: kept again, sealed anew
    changed = ip.user_ns["big"]
    assert isinstance(changed, RemoteValue) and changed.sealed and changed.key != kept.key
    run(ip, "head = big[:2].tolist()")  # fetched into the kernel, its seal checked
    assert ip.user_ns["head"] == [-1.0, 1.0]
