"""RQ as a ``compare.py`` harness: two ``rq worker`` processes on one Redis queue.

``--worker-class simple`` runs ``rq worker -w rq.worker.SimpleWorker`` x2 (jobs run in
the worker process); ``--worker-class fork`` the default ``rq.Worker`` x2, which forks a
work horse per job. Jobs name their function by import path (``peer_rq.noop``), so the
workers import this module; results come back with ``job.latest_result(timeout=...)``
(a blocking read of the job's result stream). Batch API: ``Queue.enqueue_many``.
Progress: RQ has no push path; the task writes ``job.meta`` and ``job.save_meta()``, and
the client polls ``job.get_meta(refresh=True)`` every 1 ms. Notebook cell:
``q.enqueue(noop).latest_result(timeout=60)`` with a queue made in the setup cell.
"""

# The imports below start after the clock: importing the library is timed (IMPORT_S).
# ruff: noqa: E402

from __future__ import annotations

import time

_t = time.perf_counter()
import argparse
import signal
import subprocess
import sys
import uuid
from typing import Any

import redis
from rq import Queue

IMPORT_S = time.perf_counter() - _t

WORKER_CLASSES = {"simple": "rq.worker.SimpleWorker", "fork": "rq.worker.Worker"}


def noop(*args: Any) -> None:
    return None


def total(a: Any) -> float:
    return float(a.sum())


def report(n: int, gap: float, lead: float, tail: float) -> int:
    from rq import get_current_job

    job = get_current_job()
    assert job is not None
    time.sleep(lead)
    for i in range(n):
        if gap:
            time.sleep(gap)
        job.meta["progress"] = (i, time.time())
        job.save_meta()
    time.sleep(tail)
    return n


def result_of(job: Any, timeout: int = 120) -> Any:
    res = job.latest_result(timeout=timeout)
    if res is None:
        raise TimeoutError(f"no result for job {job.id} within {timeout} s")
    if res.type != res.Type.SUCCESSFUL:
        raise RuntimeError(f"job {job.id} failed: {res.exc_string}")
    return res.return_value


class RqPeer:
    def __init__(self, url: str, worker_class: str) -> None:
        self.url = url
        self.worker_class = worker_class
        self.name = f"rq-{worker_class}"
        self.queue_name = f"nbbench-rq-{uuid.uuid4().hex[:8]}"
        # redis-py 8 reads with a 5 s socket timeout by default; a result may take longer.
        self.conn = redis.Redis.from_url(url, socket_timeout=None)
        self.q = Queue(self.queue_name, connection=self.conn)
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        from peer_common import child_env

        env = child_env()
        cmd = [sys.executable, "-m", "rq.cli", "worker", "-u", self.url, "-q"]
        cmd += ["-w", WORKER_CLASSES[self.worker_class], self.queue_name]
        for _ in range(2):
            self.workers.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            )

    def call_noop(self) -> None:
        result_of(self.q.enqueue("peer_rq.noop"))

    def submit_noops_loop(self, n: int) -> list[Any]:
        return [self.q.enqueue("peer_rq.noop") for _ in range(n)]

    def submit_noops_batch(self, n: int) -> list[Any]:
        return self.q.enqueue_many([Queue.prepare_data("peer_rq.noop") for _ in range(n)])

    def gather(self, handles: Any) -> None:
        for job in handles:
            result_of(job)

    def call_total(self, a: Any) -> float:
        return float(result_of(self.q.enqueue("peer_rq.total", a)))

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        from peer_common import PROGRESS_LEAD_S, PROGRESS_TAIL_S, poll_until

        job = self.q.enqueue("peer_rq.report", n, gap, PROGRESS_LEAD_S, PROGRESS_TAIL_S)

        def done() -> bool:
            return job.get_status(refresh=True) in ("finished", "failed")

        def read() -> tuple[int, float] | None:
            v = job.get_meta(refresh=True).get("progress")
            return (int(v[0]), float(v[1])) if v else None

        seen = poll_until(done, read)
        result_of(job)
        return "poll (job.meta, 1 ms)", seen

    def cell(self) -> tuple[dict[str, str], str, str]:
        setup = (
            "import redis\nfrom rq import Queue\nfrom peer_rq import noop\n"
            f"q = Queue({self.queue_name!r}, connection=redis.Redis.from_url({self.url!r}))\n"
            "q.enqueue(noop).latest_result(timeout=60)"
        )
        return {}, setup, "q.enqueue(noop).latest_result(timeout=60)"

    def versions(self) -> dict[str, str]:
        from peer_common import version_of

        return version_of("rq", "redis")

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)  # warm shutdown
        for w in self.workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        self.conn.close()


def _add(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--worker-class", choices=sorted(WORKER_CLASSES), default="simple")


def _make(args: argparse.Namespace) -> RqPeer:
    return RqPeer(args.url, args.worker_class)


def _throughput_tasks(args: argparse.Namespace, cfg: Any) -> int | None:
    # The forking worker runs ~90 jobs/s here: a fifth of the count keeps a round short;
    # tasks/s is a rate, so the row stays comparable.
    if args.worker_class == "fork":
        return max(200, int(cfg.cases.throughput_tasks) // 5)
    return None


if __name__ == "__main__":
    from peer_common import main

    sys.exit(main(_make, IMPORT_S, add_args=_add, throughput_tasks=_throughput_tasks))
