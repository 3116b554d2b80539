"""Overhead of ``%%task --wait`` on a trivial cell beyond a plain task round trip (p50).

Also the CPU each costs per cell in the notebook's process and in the worker's. With
``--data-libraries`` the notebook has imported numpy, pandas and matplotlib first, as a
data notebook has: their settings then travel with every cell.

With ``--kernel`` the cells run in a real kernel instead (jupyter_client, the ``python3``
kernelspec, ``%load_ext nbtask``): a plain ``x = 1`` cell and ``%%task --wait`` over
``x = 1``, interleaved, each timed from the execute request to its reply (the notebook
goal's ratio), with the CPU each costs per cell in the kernel (all its threads, and its
main thread's from ``pre_run_cell`` to ``post_run_cell``) and in the worker.

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
    parser.add_argument("--kernel", action="store_true", help="run the cells in a real kernel")
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
        if args.kernel:
            in_kernel(psutil.Process(worker.pid), args.data_libraries)
            return
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


#: Notes each cell's main-thread CPU in the kernel, by kind (``IN_KERNEL_CPU``).
_CPU_HOOKS = """
import time as _nbbench_time
_nbbench_cpu = {"plain": [], "cell": []}
_nbbench_start = [0.0]
def _nbbench_pre(info):
    _nbbench_start[0] = _nbbench_time.thread_time()
def _nbbench_post(result):
    kind = "cell" if result.info.raw_cell.startswith("%%task") else "plain"
    _nbbench_cpu[kind].append(_nbbench_time.thread_time() - _nbbench_start[0])
get_ipython().events.register("pre_run_cell", _nbbench_pre)
get_ipython().events.register("post_run_cell", _nbbench_post)
"""
_CPU_REPORT = (
    "import statistics as _s\n"
    "print(*(_s.median(_nbbench_cpu[k][-{n}:]) for k in ('plain', 'cell')))"
)


def in_kernel(worker: psutil.Process, data_libraries: bool) -> None:
    """The cells in a real kernel: reply p50s, their ratio, CPU per cell."""
    import tempfile

    from jupyter_client.manager import KernelManager

    with tempfile.TemporaryDirectory(prefix="nbbench-kernel-") as tmp:
        env = dict(os.environ, IPYTHONDIR=tmp, JUPYTER_RUNTIME_DIR=tmp)
        km = KernelManager(kernel_name="python3")
        km.start_kernel(env=env)
        kc = km.client()
        try:
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            kernel = psutil.Process(km.provisioner.process.pid)
            printed: list[str] = []

            def run(code: str) -> float:
                t = time.perf_counter()
                msg_id = kc.execute(code, store_history=True)
                while (reply := kc.get_shell_msg(timeout=120))["parent_header"].get(
                    "msg_id"
                ) != msg_id:
                    pass
                took = time.perf_counter() - t
                if reply["content"]["status"] != "ok":
                    raise RuntimeError(f"{code!r}: {reply['content'].get('evalue')}")
                while True:  # to this cell's idle
                    msg = kc.get_iopub_msg(timeout=120)
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    if msg["msg_type"] == "stream":
                        printed.append(msg["content"]["text"])
                    if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                        return took

            run("%load_ext nbtask")
            if data_libraries:
                run("import numpy, pandas, matplotlib.pyplot")
            run(_CPU_HOOKS)
            cells = {"plain": "x = 1", "cell": "%%task --wait\nx = 1"}
            for _ in range(20):  # warm up
                for code in cells.values():
                    run(code)
            times: dict[str, list[float]] = {kind: [] for kind in cells}
            cpu = {kind: [0.0, 0.0] for kind in cells}  # [kernel, worker] seconds
            for _ in range(N):
                for kind, code in cells.items():
                    there, here = _cpu(worker), _cpu(kernel)
                    times[kind].append(run(code))
                    cpu[kind][0] += _cpu(kernel) - here
                    cpu[kind][1] += _cpu(worker) - there
            run(_CPU_REPORT.format(n=N))
            main_plain, main_cell = (float(v) for v in printed[-1].split())
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    p50 = {kind: statistics.median(ts) * 1e3 for kind, ts in times.items()}
    print(f"plain cell p50: {p50['plain']:.2f} ms")
    print(f"%%task --wait cell p50: {p50['cell']:.2f} ms")
    print(f"ratio: {p50['cell'] / p50['plain']:.2f}x (n={N})")
    for kind, (kernel_cpu, worker_cpu) in cpu.items():
        main = main_plain if kind == "plain" else main_cell
        print(
            f"CPU per {kind} cell: kernel {kernel_cpu / N * 1e3:.2f} ms (main thread "
            f"{main * 1e3:.2f} ms, p50), worker {worker_cpu / N * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
