"""ipyparallel as a ``compare.py`` harness: ``ipp.Cluster(n=2)``, a load-balanced view.

One controller (hub and schedulers, default ``leastload`` scheme) and 2 engines, local
launchers, a profile directory of this run's own; defaults otherwise (heartbeat period
3 s, which dominates the cold start). Tasks: ``view.apply_async(f)`` on a load-balanced
view; functions travel by value. Batch API: ``view.map_async(f, range(n))``. Progress:
``ipyparallel.datapub.publish_data()`` in the task; the client only keeps the latest
value (``AsyncResult.data``), so it polls every 1 ms. Notebook cell: ``%%px --block
--targets 0`` over ``x = 1`` with a client made and activated in the setup cell.
``--url`` is accepted and unused: ipyparallel needs no Redis.
"""

# The imports below start after the clock: importing the library is timed (IMPORT_S).
# ruff: noqa: E402

from __future__ import annotations

import time

_t = time.perf_counter()
import argparse
import contextlib
import os
import sys
import tempfile
import uuid
from typing import Any

import ipyparallel as ipp

IMPORT_S = time.perf_counter() - _t


def noop(*args: Any) -> None:
    return None


def total(a: Any) -> float:
    return float(a.sum())


def report(n: int, gap: float, lead: float, tail: float) -> int:
    import time

    from ipyparallel.datapub import publish_data

    time.sleep(lead)
    for i in range(n):
        if gap:
            time.sleep(gap)
        publish_data({"progress": (i, time.time())})
    time.sleep(tail)
    return n


class IppPeer:
    name = "ipyparallel"

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="nbbench-ipp-")
        self.cluster_id = f"nbbench-{uuid.uuid4().hex[:8]}"
        self.cluster: Any = None
        self.rc: Any = None

    def start(self) -> None:
        self.cluster = ipp.Cluster(
            n=2, cluster_id=self.cluster_id, profile_dir=self.tmp.name, log_level=40
        )
        self.rc = self.cluster.start_and_connect_sync()
        self.view = self.rc.load_balanced_view()

    def call_noop(self) -> None:
        self.view.apply_sync(noop)

    def submit_noops_loop(self, n: int) -> list[Any]:
        return [self.view.apply_async(noop) for _ in range(n)]

    def submit_noops_batch(self, n: int) -> list[Any]:
        return [self.view.map_async(noop, range(n))]

    def gather(self, handles: Any) -> None:
        for h in handles:
            h.get(timeout=120)

    def call_total(self, a: Any) -> float:
        return float(self.view.apply_sync(total, a))

    def worker_pids(self) -> list[int]:
        return list(self.rc[:].apply_sync(os.getpid))

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        from peer_common import PROGRESS_LEAD_S, PROGRESS_TAIL_S, poll_until

        ar = self.view.apply_async(report, n, gap, PROGRESS_LEAD_S, PROGRESS_TAIL_S)

        def read() -> tuple[int, float] | None:
            data = ar.data
            v = data.get("progress") if isinstance(data, dict) else None
            return (int(v[0]), float(v[1])) if v else None

        seen = poll_until(ar.ready, read)
        ar.get(timeout=120)
        return "poll (publish_data, 1 ms)", seen

    def cell(self) -> tuple[dict[str, str], str, str]:
        setup = (
            "import ipyparallel as ipp\n"
            f"rc = ipp.Client(profile_dir={self.tmp.name!r}, cluster_id={self.cluster_id!r})\n"
            "rc.wait_for_engines(2, timeout=60)\n"
            "rc.activate()"
        )
        return {}, setup, "%%px --block --targets 0\nx = 1"

    def versions(self) -> dict[str, str]:
        from peer_common import version_of

        return version_of("ipyparallel", "pyzmq", "ipykernel")

    def stop(self) -> None:
        if self.rc is not None:
            with contextlib.suppress(Exception):
                self.rc.close()
        if self.cluster is not None:
            self.cluster.stop_cluster_sync()
        self.tmp.cleanup()


def _make(args: argparse.Namespace) -> IppPeer:
    return IppPeer()


if __name__ == "__main__":
    from peer_common import main

    sys.exit(main(_make, IMPORT_S))
