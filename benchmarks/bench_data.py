"""The data path: large arguments, results and cell variables, against the raw Redis floor.

Starts ``python -m nbtask worker -c 2`` on the Redis at ``--url`` (its own key prefix,
deleted after), then measures, median of ``--repeats``:

* ``arg_50mb_s``: a fresh 50 MB float64 array as an argument, its sum back;
* ``arg_50mb_again_s``: the same array again (blobs are named by content, but a task's
  argument blobs go when it ends: sent one after another, the array is written again);
* ``echo_50mb_s``: a fresh 50 MB array there and back;

each through the Redis at ``--url`` (``store``) and through the embedded cluster
(``embedded``: blobs in shared memory), the same through Dask's ``LocalCluster`` (``dask``,
one worker process with two threads; only where ``dask.distributed`` is installed: an
optional benchmark dependency, ``pip install 'nbtask[bench]'``), the embedded cluster and
Dask taking turns call by call, and

* ``floor_50mb_s``: raw redis-py, pickle + SET + GET + unpickle of the same bytes (one
  hop: what an argument needs at the least);
* ``cell_400mb``: a cell that makes a 400 MB array ``x`` and takes its mean, run plainly,
  under ``%%task --wait`` (``x`` stays on the workers) and with ``--fetch x`` (it comes
  back). Each way runs in ``--repeats`` fresh IPython processes, the ways interleaved
  (plain, kept, fetched, plain, ...); in each process the cell runs ``CELL_RUNS`` (5)
  times, every run timed, with ``del x`` (a kept ``x`` is released on its worker) and a
  pause of ``CELL_PAUSE_S`` (1 s) between runs. The first touch of memory new to a
  process can be far slower than touching it again (on a VM, several times), so per way:
  ``s_first``, the median of the first runs in a process; ``s``, the median of the later
  (warm) runs; ``s_runs``, every time, one list per process; ``rss_growth_mib``, the
  process's RSS growth over its first run (median over the processes; kept: also the
  extras below, measured after its last run);
* ``cell_2gb``: a ``%%task --wait`` cell that makes and keeps a 2 GB array: RSS growth,
  the time to show its preview, and a follow-up ``%%task`` cell reading it: its time and
  the bytes the kernel process read and wrote meanwhile (``/proc/self/io``).

Run it with ``PYTHONPATH`` pointing at the nbtask tree to measure::

    python benchmarks/bench_data.py --url redis://127.0.0.1:6379/0 --json-out data.json

``--only arrays`` measures only the embedded cluster and Dask (no Redis server needed): run
it alternately with ``PYTHONPATH`` on two trees to compare them on a busy machine.
``--only cell_400mb`` measures only the 400 MB cell (plain, kept, fetched), and its goal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
from bench_nbtask import _start_worker, _stop
from common import delete_prefix
from data_goals import goal_lines

__all__ = ["main"]

ARRAY_ITEMS = 50_000_000 // 8


def total(a: Any) -> float:
    return float(a.sum())


def echo(a: Any) -> Any:
    return a


def _median_time(call: Callable[[int], object], repeats: int) -> float:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_arrays(apps: Mapping[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """50 MB arrays to and from each app's workers: fresh content, then the same again.

    The apps take turns call by call (one of each case on the first, then on the next,
    ...), so a busy moment of the machine falls on all of them alike.
    """
    array = np.random.default_rng(0).random(ARRAY_ITEMS)

    def fresh(i: int) -> np.ndarray[Any, Any]:
        array[0] = time.perf_counter() + i  # new content, new blob
        return array

    cases: dict[str, dict[str, Callable[[int], object]]] = {}
    for name, app in apps.items():
        remote_total, remote_echo = app.task(total), app.task(echo)
        remote_total.delay(np.zeros(1)).get(timeout=60)  # the workers are consuming
        cases[name] = {
            "arg_50mb_s": lambda i, f=remote_total: f.delay(fresh(i)).get(timeout=120),
            "arg_50mb_again_s": lambda i, f=remote_total: f.delay(array).get(timeout=120),
            "echo_50mb_s": lambda i, f=remote_echo: f.delay(fresh(i)).get(timeout=120),
        }
    times: dict[str, dict[str, list[float]]] = {
        name: {case: [] for case in calls} for name, calls in cases.items()
    }
    for i in range(repeats):
        for name, calls in cases.items():
            for case, call in calls.items():
                started = time.perf_counter()
                call(i)
                times[name][case].append(time.perf_counter() - started)
    return {
        name: {case: statistics.median(taken) for case, taken in by_case.items()}
        for name, by_case in times.items()
    }


def measure_floor(url: str, prefix: str, repeats: int) -> float:
    """Raw redis-py: pickle, SET, GET and unpickle a fresh 50 MB array."""
    client = redis.Redis.from_url(url)
    key = f"{prefix}:floor"
    array = np.random.default_rng(1).random(ARRAY_ITEMS)

    def one(i: int) -> None:
        array[0] = i
        client.set(key, pickle.dumps(array, protocol=5))
        pickle.loads(client.get(key) or b"")

    try:
        return _median_time(one, repeats)
    finally:
        client.delete(key)
        client.close()


@contextlib.contextmanager
def embedded_app() -> Iterator[Any]:
    """An app on the embedded cluster (blobs in shared memory), ``NBTASK_*`` set aside."""
    from nbtask import App

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("NBTASK_")}
    app = App("bench-embedded")
    try:
        yield app
    finally:
        app.close()
        os.environ.update(saved)


@contextlib.contextmanager
def dask_app() -> Iterator[Any | None]:
    """Dask's ``LocalCluster`` as an app; ``None`` without ``dask.distributed``."""
    try:
        from dask.distributed import Client, LocalCluster  # optional: a benchmark extra
    except ImportError:
        yield None
        return
    # Dask warns that a 50 MB argument makes a large graph: that is what is measured.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield _DaskTasks(client)


def measure_embedded_and_dask(repeats: int) -> dict[str, dict[str, float] | None]:
    """The arrays through the embedded cluster and Dask (if installed), taking turns."""
    with embedded_app() as embedded, dask_app() as dask:
        apps = {"embedded": embedded} | ({"dask": dask} if dask is not None else {})
        return {"dask": None} | measure_arrays(apps, repeats)


class _DaskTasks:
    """Just enough of an app for :func:`measure_arrays`: ``app.task(f).delay(a).get()``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def task(self, function: Callable[[Any], Any]) -> _DaskTask:
        return _DaskTask(self.client, function)


class _DaskTask:
    def __init__(self, client: Any, function: Callable[[Any], Any]) -> None:
        self.client, self.function = client, function

    def delay(self, *args: Any) -> _DaskResult:
        return _DaskResult(self.client.submit(self.function, *args, pure=False))


class _DaskResult:
    def __init__(self, future: Any) -> None:
        self.future = future

    def get(self, timeout: float) -> Any:
        return self.future.result(timeout=timeout)


_CELL_RUNNER = """
import json, os, sys, time
from IPython.testing.globalipapp import start_ipython

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

def io_mb():
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return (int(fields["rchar"]) + int(fields["wchar"])) / 1e6

ip = start_ipython()
how, cell, runs, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if how != "plain":
    ip.run_line_magic("load_ext", "nbtask")
    ip.run_cell("%%task --wait\\nwarm = 1\\n")
magic = {"plain": "", "kept": "%%task --wait\\n", "fetched": "%%task --wait --fetch x\\n"}
out = {"s_runs": []}
for run in range(runs):
    if run:
        assert ip.run_cell("del x\\n").success  # a kept x: released on its worker
        time.sleep(pause)
    before = rss()
    started = time.perf_counter()
    result = ip.run_cell(magic[how] + cell)
    out["s_runs"].append(time.perf_counter() - started)
    assert result.success, result.error_in_exec
    if not run:
        out["rss_growth_mib"] = rss() - before
if how == "kept":
    started = time.perf_counter()
    preview = repr(ip.user_ns["x"])
    out["preview_s"] = time.perf_counter() - started
    io_before, started = io_mb(), time.perf_counter()
    assert ip.run_cell("%%task --wait\\nfirst = float(x[::1000].sum())\\n").success
    out["follow_up_s"] = time.perf_counter() - started
    out["follow_up_kernel_io_mb"] = io_mb() - io_before
print(json.dumps(out))
"""
#: Each cell makes ``x`` and takes its mean; the 2 GB one only keeps it.
CELLS = {
    "cell_400mb": "import numpy as np\nx = np.ones(50_000_000)\nm = float(x.mean())\n",
    "cell_2gb": "import numpy as np\nx = np.ones(250_000_000)\n",
}


#: How the 400 MB cell runs: plainly, ``x`` kept on the workers, ``x`` fetched.
WAYS = ("plain", "kept", "fetched")
#: Runs of the 400 MB cell in each process (the first touches memory new to the process).
CELL_RUNS = 5
#: Between two runs in a process: time for a released ``x`` to be dropped on its worker.
CELL_PAUSE_S = 1.0


def measure_cell(
    url: str, prefix: str, secret: str, how: str, cell: str, runs: int = 1
) -> dict[str, Any]:
    """``cell`` run ``how`` (plain, kept, fetched) ``runs`` times in a fresh IPython process.

    ``s_runs`` has each run's time; ``rss_growth_mib`` is the first run's.
    """
    env = {**os.environ, "NBTASK_BROKER": url, "NBTASK_SECRET": secret}
    env["NBTASK_KEY_PREFIX"] = prefix
    done = subprocess.run(
        [sys.executable, "-c", _CELL_RUNNER, how, cell, str(runs), str(CELL_PAUSE_S)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def measure_cell_ways(
    url: str, prefix: str, secret: str, cell: str, repeats: int
) -> dict[str, dict[str, Any]]:
    """``cell`` each way in ``repeats`` fresh processes, the ways interleaved."""
    processes: dict[str, list[dict[str, Any]]] = {how: [] for how in WAYS}
    for _ in range(repeats):
        for how in WAYS:
            processes[how].append(measure_cell(url, prefix, secret, how, cell, CELL_RUNS))
    return {how: _cell_summary(found) for how, found in processes.items()}


def _cell_summary(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Warm (``s``) and first-run (``s_first``) medians, every time, other figures' medians."""
    s_runs = [p["s_runs"] for p in processes]
    out: dict[str, Any] = {
        "s": statistics.median(s for runs in s_runs for s in runs[1:]),
        "s_first": statistics.median(runs[0] for runs in s_runs),
        "s_runs": s_runs,
    }
    for key in processes[0]:  # rss_growth_mib, the kept-only extras
        if key != "s_runs":
            out[key] = statistics.median(p[key] for p in processes)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out")
    parser.add_argument("--only", choices=("all", "arrays", "cell_400mb"), default="all")
    args = parser.parse_args(argv)
    if args.only == "arrays":
        return _report(measure_embedded_and_dask(args.repeats), args.json_out)
    prefix = f"nbbench-data-{uuid.uuid4().hex[:10]}"
    secret = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="nbbench-data-") as tmp:
        worker = _start_worker(args.url, secret, prefix, Path(tmp) / "worker.log")
        try:
            out: dict[str, Any] = {}
            if args.only == "cell_400mb":
                out["cell_400mb"] = measure_cell_ways(
                    args.url, prefix, secret, CELLS["cell_400mb"], args.repeats
                )
                return _report(out, args.json_out)
            from nbtask import App

            app = App("bench-data", broker=args.url, secret=secret, key_prefix=prefix)
            try:
                out["store"] = measure_arrays({"store": app}, args.repeats)["store"]
            finally:
                app.close()
            out["floor_50mb_s"] = measure_floor(args.url, prefix, args.repeats)
            out.update(measure_embedded_and_dask(args.repeats))
            out["cell_400mb"] = measure_cell_ways(
                args.url, prefix, secret, CELLS["cell_400mb"], args.repeats
            )
            big = measure_cell(args.url, prefix, secret, "kept", CELLS["cell_2gb"])
            out["cell_2gb"] = {"s": big.pop("s_runs")[0], **big}
        finally:
            _stop(worker)
            delete_prefix(args.url, prefix)
    return _report(out, args.json_out)


def _report(out: dict[str, Any], json_out: str | None) -> int:
    text = json.dumps(out, indent=2)
    print(text)
    print("\n".join(goal_lines(out)))
    if json_out:
        Path(json_out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
