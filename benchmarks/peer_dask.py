"""Dask as a ``compare.py`` harness: ``LocalCluster(n_workers=2, threads_per_worker=1)``.

Worker processes (``processes=True``, spawned, each under a nanny that runs in this
process with the scheduler), no dashboard. Tasks are ``client.submit(f, pure=False)``
(so nothing is served from a cached key); functions travel by value (cloudpickle).
Batch API: ``client.map(f, range(n), pure=False)``, gathered with ``client.gather``.
Progress: ``get_worker().log_event(topic, ...)`` in the task, seen through
``client.subscribe_topic`` (push, through the scheduler). Notebook cell:
``client.submit(noop, pure=False).result()`` with a ``Client`` connected in the setup
cell to this harness's scheduler. ``--url`` is accepted (for the shared command line)
and unused: Dask needs no Redis.
"""

# The imports below start after the clock: importing the library is timed (IMPORT_S).
# ruff: noqa: E402

from __future__ import annotations

import time

_t = time.perf_counter()
import argparse
import os
import sys
import threading
import uuid
from typing import Any

from distributed import Client, LocalCluster

IMPORT_S = time.perf_counter() - _t


def noop(*args: Any) -> None:
    return None


def total(a: Any) -> float:
    return float(a.sum())


def report(topic: str, n: int, gap: float, lead: float, tail: float) -> int:
    import time

    from distributed import get_worker

    worker = get_worker()
    time.sleep(lead)
    for i in range(n):
        if gap:
            time.sleep(gap)
        worker.log_event(topic, {"i": i, "t": time.time()})
    time.sleep(tail)
    return n


class DaskPeer:
    name = "dask"

    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None

    def start(self) -> None:
        self.cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = Client(self.cluster)

    def call_noop(self) -> None:
        self.client.submit(noop, pure=False).result()

    def submit_noops_loop(self, n: int) -> list[Any]:
        return [self.client.submit(noop, pure=False) for _ in range(n)]

    def submit_noops_batch(self, n: int) -> list[Any]:
        return list(self.client.map(noop, range(n), pure=False))

    def gather(self, handles: Any) -> None:
        self.client.gather(list(handles))

    def call_total(self, a: Any) -> float:
        return float(self.client.submit(total, a, pure=False).result())

    def worker_pids(self) -> list[int]:
        return list(self.client.run(os.getpid).values())

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        from peer_common import PROGRESS_LEAD_S, PROGRESS_TAIL_S

        topic = f"nbbench-{uuid.uuid4().hex[:8]}"
        seen: list[tuple[int, float, float]] = []
        lock = threading.Lock()

        def handler(event: Any) -> None:
            now = time.time()
            msg = event[1]
            with lock:
                seen.append((int(msg["i"]), float(msg["t"]), now))

        self.client.subscribe_topic(topic, handler)
        fut = self.client.submit(
            report, topic, n, gap, PROGRESS_LEAD_S, PROGRESS_TAIL_S, pure=False
        )
        fut.result()
        self.client.unsubscribe_topic(topic)
        with lock:
            return "push (log_event, subscribe_topic)", list(seen)

    def cell(self) -> tuple[dict[str, str], str, str]:
        address = self.client.scheduler.address
        setup = (
            "from distributed import Client\n"
            f"client = Client({address!r})\n"
            "def noop():\n    return None\n"
            "client.submit(noop, pure=False).result()"
        )
        return {}, setup, "client.submit(noop, pure=False).result()"

    def versions(self) -> dict[str, str]:
        from peer_common import version_of

        return version_of("dask", "distributed", "msgpack", "cloudpickle")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _make(args: argparse.Namespace) -> DaskPeer:
    return DaskPeer()


if __name__ == "__main__":
    from peer_common import main

    sys.exit(main(_make, IMPORT_S))
