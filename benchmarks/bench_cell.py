"""Overhead of ``%%task --wait`` on a trivial cell beyond a plain task round trip (p50).

Needs the Redis at 127.0.0.1:6379 (or NBTASK_TEST_REDIS). Run: ``python benchmarks/bench_cell.py``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid

N = int(os.environ.get("BENCH_N", "300"))
URL = os.environ.get("NBTASK_TEST_REDIS", "redis://127.0.0.1:6379/0")


def main() -> None:
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
        for _ in range(20):  # warm up: worker shell, shipped task code, connections
            noop.delay(1).get(timeout=30)
            ip.run_cell_magic("task", "--wait", "y = x + 1")
        plain, cell = [], []
        for _ in range(N):
            t = time.perf_counter()
            noop.delay(1).get(timeout=30)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            ip.run_cell_magic("task", "--wait", "y = x + 1")
            cell.append(time.perf_counter() - t)
        p50_plain, p50_cell = statistics.median(plain), statistics.median(cell)
        print(f"plain task round trip p50: {p50_plain * 1e3:.2f} ms")
        print(f"%%task --wait trivial cell p50: {p50_cell * 1e3:.2f} ms")
        print(f"overhead p50: {(p50_cell - p50_plain) * 1e3:.2f} ms (n={N})")
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
