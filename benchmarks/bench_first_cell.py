"""The first ``%%task`` cells of a notebook, written a few seconds after ``%load_ext nbtask``.

A worker process makes the shell that runs cells on first use; a notebook session has
each idle worker process make ready beforehand (``nbtask/notebook/warmup.py``). Each run
is a fresh IPython process that loads the extension, waits ``--pause`` seconds (the user
writing the first cell), then times three trivial ``%%task --wait`` cells, against:

* ``worker``: a fresh ``python -m nbtask worker -c 1`` on the Redis at ``--url`` (its own
  key prefix, deleted after), started with the run;
* ``embedded``: the embedded cluster (no broker configured: a private Redis and two
  worker processes, started by ``%load_ext``).

Median over ``--runs`` of each cell's time, and every figure. Run it with ``PYTHONPATH``
pointing at the nbtask tree to measure (alternate two trees to compare them)::

    python benchmarks/bench_first_cell.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench_nbtask import _start_worker, _stop
from common import delete_prefix

__all__ = ["main"]

CELLS = 3

_RUNNER = """
import json, sys, time
from IPython.testing.globalipapp import start_ipython

ip = start_ipython()
ip.run_line_magic("load_ext", "nbtask")
time.sleep(float(sys.argv[1]))
times = []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    assert ip.run_cell("%%task --wait\\ny = 1\\n").success
    times.append(time.perf_counter() - started)
ip.run_line_magic("unload_ext", "nbtask")
print(json.dumps(times))
"""


def first_cells(env: dict[str, str], pause: float) -> list[float]:
    """The seconds of the first :data:`CELLS` cells in a fresh IPython process."""
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(pause), str(CELLS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    times: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}


def measure_worker(url: str, pause: float) -> list[float]:
    """A fresh one-process worker on ``url``, then a notebook's first cells on it."""
    prefix = f"nbbench-first-{uuid.uuid4().hex[:10]}"
    secret = secrets.token_hex(32)
    env = {**_clean_env(), "NBTASK_BROKER": url, "NBTASK_SECRET": secret}
    env["NBTASK_KEY_PREFIX"] = prefix
    with tempfile.TemporaryDirectory(prefix="nbbench-first-") as tmp:
        worker = _start_worker(url, secret, prefix, Path(tmp) / "worker.log", concurrency=1)
        try:
            time.sleep(2.0)  # ready, idle: as a worker is before a notebook comes
            return first_cells(env, pause)
        finally:
            _stop(worker)
            delete_prefix(url, prefix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=3.0)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    runs: dict[str, list[list[float]]] = {"worker": [], "embedded": []}
    for _ in range(args.runs):  # interleaved
        runs["worker"].append(measure_worker(args.url, args.pause))
        runs["embedded"].append(first_cells(_clean_env(), args.pause))
    out = {
        how: {
            "median_s": [statistics.median(run[i] for run in got) for i in range(CELLS)],
            "runs_s": got,
        }
        for how, got in runs.items()
    }
    text = json.dumps(out, indent=2)
    print(text)
    for how, figures in out.items():
        cells = ", ".join(f"{s * 1e3:.0f} ms" for s in figures["median_s"])
        print(f"{how}: first {CELLS} cells, {args.pause:g} s after %load_ext: {cells}")
    if args.json_out:
        Path(args.json_out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
