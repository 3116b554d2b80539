"""Overhead of ``%%task --wait`` on a trivial cell beyond a plain task round trip (p50).

Also the CPU each costs per cell in the notebook's process and in the worker's. With
``--data-libraries`` the notebook has imported numpy, pandas and matplotlib first, as a
data notebook has: their settings then travel with every cell.

With ``--kernel`` the cells run in a real kernel instead (jupyter_client, the ``python3``
kernelspec, ``%load_ext nbtask``): a plain ``x = 1`` cell and ``%%task --wait`` over
``x = 1``, interleaved, each timed from the execute request to its reply (the notebook
goal's ratio), with the CPU each costs per cell in the kernel (all its threads, and its
main thread's from ``pre_run_cell`` to ``post_run_cell``) and in the worker. With
``--against DIR`` as well, a second kernel and worker run the same cells from the nbtask of
``DIR`` (a checkout of another commit: ``git worktree add /tmp/main main``), the two taking
turns in blocks of cells, so that both meet the same load on the machine: an A/B of one run.

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
    parser.add_argument(
        "--against", metavar="DIR", help="with --kernel: also run them from the nbtask in DIR"
    )
    args = parser.parse_args()
    if args.against and not args.kernel:
        parser.error("--against compares kernels: give --kernel too")
    if args.kernel:
        in_kernel(args.data_libraries, args.against)
        return
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


#: With ``--against``: the turns each kernel takes (in blocks of cells, first one then the other).
_TURNS = 6


class _Kernel:
    """A real kernel with ``%load_ext nbtask`` and a worker of its own, from one nbtask.

    ``tree``: where its nbtask is imported from (first on ``PYTHONPATH``); ``None``: as
    this process imports it.
    """

    def __init__(self, tree: str | None, folder: str) -> None:
        from jupyter_client.manager import KernelManager

        self.tree = tree
        self.prefix = f"nbbench-{uuid.uuid4().hex[:8]}"
        env = dict(
            os.environ,
            NBTASK_BROKER=URL,
            NBTASK_SECRET="bench-" + uuid.uuid4().hex,
            NBTASK_KEY_PREFIX=self.prefix,
            IPYTHONDIR=folder,
            JUPYTER_RUNTIME_DIR=folder,
        )
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [env.get("PYTHONPATH")])])
        command = ["worker", "-b", URL, "--key-prefix", self.prefix, "-c", "1"]
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "nbtask", *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.manager = KernelManager(kernel_name="python3")
        try:
            self.manager.start_kernel(env=env)
        except BaseException:
            self.worker.terminate()
            raise
        self.client = self.manager.client()
        self.printed: list[str] = []
        self.times: dict[str, list[float]] = {kind: [] for kind in _CELLS}
        self.cpu = {kind: [0.0, 0.0] for kind in _CELLS}  # [kernel, worker] seconds

    def start(self, data_libraries: bool) -> None:
        """Load nbtask (and the data libraries), note the main thread's CPU, warm up."""
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.kernel = psutil.Process(self.manager.provisioner.process.pid)
        self.workers = psutil.Process(self.worker.pid)
        self.run("%load_ext nbtask")
        if data_libraries:
            self.run("import numpy, pandas, matplotlib.pyplot")
        self.run(_CPU_HOOKS)
        for _ in range(20):  # warm up
            for code in _CELLS.values():
                self.run(code)

    def run(self, code: str) -> float:
        """Run ``code``: the time from the execute request to its reply."""
        t = time.perf_counter()
        msg_id = self.client.execute(code, store_history=True)
        while (reply := self.client.get_shell_msg(timeout=120))["parent_header"].get(
            "msg_id"
        ) != msg_id:
            pass
        took = time.perf_counter() - t
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"{code!r}: {reply['content'].get('evalue')}")
        while True:  # to this cell's idle
            msg = self.client.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                self.printed.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return took

    def timed(self, n: int) -> None:
        """Run ``n`` pairs of cells, a plain one then a ``%%task --wait`` one, timed."""
        for _ in range(n):
            for kind, code in _CELLS.items():
                there, here = _cpu(self.workers), _cpu(self.kernel)
                self.times[kind].append(self.run(code))
                self.cpu[kind][0] += _cpu(self.kernel) - here
                self.cpu[kind][1] += _cpu(self.workers) - there

    def results(self) -> list[str]:
        """Reply p50s, their ratio, CPU per cell."""
        n = len(self.times["cell"])
        self.run(_CPU_REPORT.format(n=n))
        main = dict(zip(_CELLS, (float(v) for v in self.printed[-1].split()), strict=True))
        p50 = {kind: statistics.median(ts) * 1e3 for kind, ts in self.times.items()}
        lines = [
            f"plain cell p50: {p50['plain']:.2f} ms",
            f"%%task --wait cell p50: {p50['cell']:.2f} ms",
            f"ratio: {p50['cell'] / p50['plain']:.2f}x (n={n})",
        ]
        for kind, (kernel_cpu, worker_cpu) in self.cpu.items():
            label = "plain" if kind == "plain" else "%%task --wait"
            lines.append(
                f"CPU per {label} cell: kernel {kernel_cpu / n * 1e3:.2f} ms (main thread "
                f"{main[kind] * 1e3:.2f} ms, p50), worker {worker_cpu / n * 1e3:.2f} ms"
            )
        return lines

    def close(self) -> None:
        """Stop the kernel and the worker; delete the keys they made."""
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)
        self.worker.terminate()
        self.worker.wait(10)
        import redis

        client = redis.Redis.from_url(URL)
        keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


#: The cells timed, by kind: a plain one and the same as a trivial ``%%task --wait`` one.
_CELLS = {"plain": "x = 1", "cell": "%%task --wait\nx = 1"}


def in_kernel(data_libraries: bool, against: str | None) -> None:
    """The cells in a real kernel (and one from ``against``): reply p50s, ratio, CPU per cell."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nbbench-kernel-") as tmp:
        kernels: list[_Kernel] = []
        try:
            for tree in [None, *([against] if against else [])]:
                folder = os.path.join(tmp, str(len(kernels)))
                os.mkdir(folder)
                kernels.append(_Kernel(tree, folder))
                kernels[-1].start(data_libraries)
            turns = _TURNS if against else 1
            for turn in range(turns):
                for kernel in kernels if turn % 2 == 0 else kernels[::-1]:
                    kernel.timed(max(1, N // turns))
            results = [kernel.results() for kernel in kernels]
        finally:
            for kernel in kernels:
                kernel.close()
    for kernel, lines in zip(kernels, results, strict=True):
        if against:
            print(f"nbtask from {kernel.tree or 'this checkout'}:")
        print("\n".join(("  " if against else "") + line for line in lines))


if __name__ == "__main__":
    main()
