"""Overhead of ``%%task --wait`` on a trivial cell beyond a plain task round trip (p50).

Also the CPU each costs per cell in the notebook's process and in the worker's. With
``--data-libraries`` the notebook has imported numpy, pandas and matplotlib first, as a
data notebook has: their settings then travel with every cell.

Needs the Redis at 127.0.0.1:6379 (or NBTASK_TEST_REDIS). Run: ``python benchmarks/bench_cell.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import psutil

N = int(os.environ.get("BENCH_N", "300"))
URL = os.environ.get("NBTASK_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _cpu(process: psutil.Process) -> float:
    """CPU seconds of ``process`` and its children."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-libraries", action="store_true", help="import numpy, pandas, matplotlib first"
    )
    args = parser.parse_args()
    prefix = f"nbbench-{uuid.uuid4().hex[:8]}"
    os.environ.update(
        {
            "NBTASK_BROKER": URL,
            "NBTASK_SECRET": "bench-" + uuid.uuid4().hex,
            "NBTASK_KEY_PREFIX": prefix,
        }
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "nbtask", "worker", "-b", URL, "--key-prefix", prefix, "-c", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from IPython.testing.globalipapp import start_ipython

        ip = start_ipython()
        assert ip is not None
        ip.run_line_magic("load_ext", "nbtask")
        from nbtask.notebook.magics import session_of

        session = session_of(ip)
        assert session is not None
        app = session.app

        @app.task
        def noop(x: int) -> int:
            return x

        ip.user_ns["x"] = 1
        if args.data_libraries:
            ip.run_cell("import numpy, pandas, matplotlib.pyplot")
        for _ in range(20):  # warm up: worker shell, shipped task code, connections
            noop.delay(1).get(timeout=30)
            ip.run_cell_magic("task", "--wait", "y = x + 1")
        plain: list[float] = []
        cell: list[float] = []
        cpu = {"plain": [0.0, 0.0], "cell": [0.0, 0.0]}  # [notebook, worker] seconds
        workers = psutil.Process(worker.pid)

        def timed(kind: str, run: Callable[[], object], into: list[float]) -> None:
            # Reading the worker's CPU (psutil) stays outside this process's own count.
            there = _cpu(workers)
            here, t = time.process_time(), time.perf_counter()
            run()
            into.append(time.perf_counter() - t)
            cpu[kind][0] += time.process_time() - here
            cpu[kind][1] += _cpu(workers) - there

        for _ in range(N):
            timed("plain", lambda: noop.delay(1).get(timeout=30), plain)
            timed("cell", lambda: ip.run_cell_magic("task", "--wait", "y = x + 1"), cell)
        p50_plain, p50_cell = statistics.median(plain), statistics.median(cell)
        print(f"plain task round trip p50: {p50_plain * 1e3:.2f} ms")
        print(f"%%task --wait trivial cell p50: {p50_cell * 1e3:.2f} ms")
        print(f"overhead p50: {(p50_cell - p50_plain) * 1e3:.2f} ms (n={N})")
        for kind, (notebook, workers_cpu) in cpu.items():
            print(
                f"CPU per {kind}: notebook {notebook / N * 1e3:.2f} ms, "
                f"worker {workers_cpu / N * 1e3:.2f} ms"
            )
        ip.run_line_magic("unload_ext", "nbtask")
    finally:
        worker.terminate()
        worker.wait(10)
        import redis

        client = redis.Redis.from_url(URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main()
