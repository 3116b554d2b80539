"""Celery as a ``compare.py`` harness: Redis broker and result backend, prefork x2.

Worker: ``celery -A peer_celery worker -P prefork -c 2 -Q <unique queue>``, defaults
otherwise (mingle, gossip, heartbeat on; prefetch multiplier 4; early ack). JSON for the
no-op and progress tasks; the 50 MB array goes as pickle (``apply_async(serializer=
'pickle')``, the worker accepts json and pickle; as root that needs ``C_FORCE_ROOT=1``).
Batch API: ``group(...).apply_async()``. Progress: ``self.update_state(state='PROGRESS',
meta=...)`` in the task, seen through ``AsyncResult.get(on_message=...)`` (push over the
result backend's pub/sub). Notebook cell: ``noop.delay().get()`` with this module
imported in the kernel. Celery imports tasks by name, so they live in this module, which
the worker imports as ``peer_celery`` (configured from ``PEER_CELERY_URL`` /
``PEER_CELERY_QUEUE``).
"""

# The imports below start after the clock: importing the library is timed (IMPORT_S).
# ruff: noqa: E402

from __future__ import annotations

import time

_t = time.perf_counter()
import argparse
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, group

IMPORT_S = time.perf_counter() - _t

URL = os.environ.get("PEER_CELERY_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("PEER_CELERY_QUEUE", "nbbench-celery")

app = Celery("peer_celery", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=QUEUE,
    accept_content=["json", "pickle"],
    result_accept_content=["json", "pickle"],
    task_serializer="json",
    result_serializer="json",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(*args: Any) -> None:
    return None


@app.task(name="bench.total")
def total(a: Any) -> float:
    return float(a.sum())


@app.task(name="bench.report", bind=True)
def report(self: Any, n: int, gap: float, lead: float, tail: float) -> int:
    time.sleep(lead)
    for i in range(n):
        if gap:
            time.sleep(gap)
        self.update_state(state="PROGRESS", meta={"i": i, "t": time.time()})
    time.sleep(tail)
    return n


class CeleryPeer:
    name = "celery"

    def __init__(self) -> None:
        self.worker: subprocess.Popen[bytes] | None = None
        self.log = Path(f"/tmp/nbbench-celery-{uuid.uuid4().hex[:8]}.log")

    def start(self) -> None:
        from peer_common import child_env

        env = child_env(C_FORCE_ROOT="1", PEER_CELERY_URL=URL, PEER_CELERY_QUEUE=QUEUE)
        cmd = [sys.executable, "-m", "celery", "-A", "peer_celery", "worker"]
        cmd += ["-P", "prefork", "-c", "2", "-Q", QUEUE, "--loglevel", "WARNING"]
        with open(self.log, "wb") as log:
            self.worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def call_noop(self) -> None:
        noop.delay().get(timeout=120)

    def submit_noops_loop(self, n: int) -> list[Any]:
        return [noop.delay() for _ in range(n)]

    def submit_noops_batch(self, n: int) -> list[Any]:
        return list(group(noop.s() for _ in range(n)).apply_async().results)

    def gather(self, handles: Any) -> None:
        for h in handles:
            h.get(timeout=120)

    def call_total(self, a: Any) -> float:
        return float(total.apply_async((a,), serializer="pickle").get(timeout=120))

    def worker_pids(self) -> list[int]:
        import psutil

        assert self.worker is not None
        return [c.pid for c in psutil.Process(self.worker.pid).children()]

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        from peer_common import PROGRESS_LEAD_S, PROGRESS_TAIL_S

        seen: list[tuple[int, float, float]] = []

        def on_message(body: dict[str, Any]) -> None:
            if body.get("status") == "PROGRESS":
                meta = body["result"]
                seen.append((int(meta["i"]), float(meta["t"]), time.time()))

        res = report.delay(n, gap, PROGRESS_LEAD_S, PROGRESS_TAIL_S)
        res.get(on_message=on_message, timeout=120)
        return "push (update_state, get(on_message=))", seen

    def cell(self) -> tuple[dict[str, str], str, str]:
        env = {"PEER_CELERY_URL": URL, "PEER_CELERY_QUEUE": QUEUE}
        return env, "from peer_celery import noop\nnoop.delay().get()", "noop.delay().get()"

    def versions(self) -> dict[str, str]:
        from peer_common import version_of

        return version_of("celery", "kombu", "billiard", "redis")

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.log.unlink(missing_ok=True)


def _make(args: argparse.Namespace) -> CeleryPeer:
    if args.url != URL:
        raise SystemExit("run through compare.py, or set PEER_CELERY_URL to --url")
    return CeleryPeer()


if __name__ == "__main__":
    from peer_common import main

    sys.exit(main(_make, IMPORT_S))
