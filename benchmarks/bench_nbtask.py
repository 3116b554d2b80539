"""nbtask through its public API: the same cases as ``floor.py``, plus cold start and memory.

With ``--url`` it starts ``python -m nbtask worker -b URL -c 2`` (secret and a unique
key prefix in the environment), runs latency / throughput / 50 MB through an
``App`` connected to that broker, stops the worker with SIGTERM and deletes only
the keys under its prefix. Then, with the worker gone, it measures the embedded
cluster's cold start ``--cold-runs`` times, each in a fresh process
(``--cold-one``): ``App("bench")`` with no broker configured, to the first no-op
result. That same process then waits for the cluster to go idle and reads the
RSS of the worker's child processes.

    python benchmarks/bench_nbtask.py --url redis://127.0.0.1:6379/9 --json-out out.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Only the standard library at module level: a ``--cold-one`` process must time
# ``import nbtask`` by itself, and must not hand numpy pages to a forked worker.

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
_NBTASK_ENV = ("NBTASK_BROKER", "NBTASK_SECRET", "NBTASK_SECRET_FILE", "NBTASK_KEY_PREFIX")


# Task bodies live in __main__, so nbtask ships them by value (the worker
# imports no user module), as the floor does.
def noop() -> None:
    return None


def total(a: Any) -> float:
    return float(a.sum())


class NbtaskDriver:
    """Implements :class:`common.Driver` with nbtask's public API."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.noop = app.task(noop)
        self.total = app.task(total)
        self.timeout = timeout

    def call_noop(self) -> None:
        self.noop.delay().get(timeout=self.timeout)

    def submit_noops_loop(self, n: int) -> list[Any]:
        return [self.noop.delay() for _ in range(n)]

    def submit_noops_batch(self, n: int) -> list[Any]:
        return list(self.noop.delay_many([() for _ in range(n)]))

    def gather(self, handles: Sequence[Any]) -> None:
        for h in handles:
            h.get(timeout=self.timeout)

    def call_total(self, a: Any) -> float:
        return float(self.total.delay(a).get(timeout=self.timeout))


# --------------------------------------------------------------------------- remote broker


def _start_worker(
    url: str,
    secret: str,
    prefix: str,
    log_path: Path,
    *,
    concurrency: int = 2,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in _NBTASK_ENV}
    env.update(extra_env or {}, NBTASK_SECRET=secret, NBTASK_KEY_PREFIX=prefix)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "nbtask", "worker", "-b", url, "-c", str(concurrency)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """SIGTERM (warm shutdown) and wait; return the seconds it took to exit."""
    t0 = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.perf_counter() - t0


def measure_remote(url: str, quick: bool, profile: str | None) -> dict[str, Any]:
    from common import Config, delete_prefix, redis_cpu_reader, run_cases

    cfg = Config.quick() if quick else Config()
    prefix = f"nbbench-{uuid.uuid4().hex[:12]}"
    secret = secrets.token_hex(32)
    from nbtask import App

    with tempfile.TemporaryDirectory(prefix="nbbench-worker-") as tmp:
        log_path = Path(tmp) / "worker.log"
        t0 = time.perf_counter()
        worker = _start_worker(url, secret, prefix, log_path)
        app = None
        stop_s: float | None = None
        try:
            app = App("bench", broker=url, secret=secret, key_prefix=prefix)
            driver = NbtaskDriver(app, cfg.timeout)
            driver.call_noop()  # returns once the worker is consuming
            startup_s = time.perf_counter() - t0
            if profile:
                import cProfile

                with cProfile.Profile() as prof:
                    out = run_cases(driver, cfg, redis_cpu_reader(url))
                prof.dump_stats(profile)
            else:
                out = run_cases(driver, cfg, redis_cpu_reader(url))
        except BaseException:
            sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            if app is not None:
                app.close()
            stop_s = _stop(worker)
            deleted = delete_prefix(url, prefix)
    out["info"] = {
        "key_prefix": prefix,
        "worker_startup_s": startup_s,
        "worker_stop_s": stop_s,
        "worker_exit_code": worker.returncode,
        "keys_deleted": deleted,
    }
    return out


# --------------------------------------------------------------------------- embedded cluster


def _vmrss_mib(pid: int) -> float:
    # VmRSS from /proc, as the issue asks; psutil's rss is the same number.
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cold_one(idle_wait: float) -> dict[str, Any]:
    """One cold start in this (fresh) process; then idle memory; then close."""
    t = time.perf_counter()
    from nbtask import App

    import_s = time.perf_counter() - t

    t0 = time.perf_counter()
    app = App("bench")
    noop_task = app.task(noop)
    noop_task.delay().get(timeout=120)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    noop_task.delay().get(timeout=120)
    second = time.perf_counter() - t1

    import psutil

    # The embedded cluster process is the worker supervisor (app.cluster.worker_pid).
    # Its children are the forked worker children, which run the supervisor's own
    # executable, and the private redis-server, which does not.
    if app.cluster is None:
        raise RuntimeError("App() did not start an embedded cluster; is NBTASK_BROKER set?")
    supervisor = psutil.Process(app.cluster.worker_pid)
    time.sleep(idle_wait)
    everyone = supervisor.children(recursive=True)
    children = [c for c in everyone if c.exe() == supervisor.exe()]
    others = [c for c in everyone if c not in children]
    child_rss = [_vmrss_mib(c.pid) for c in children]
    child_uss = [c.memory_full_info().uss / 2**20 for c in children]
    memory = {
        "supervisor_pid": supervisor.pid,
        "supervisor_rss_mib": _vmrss_mib(supervisor.pid),
        "children": len(children),
        "child_rss_mib": child_rss,
        "child_rss_max_mib": max(child_rss) if child_rss else None,
        "child_uss_max_mib": max(child_uss) if child_uss else None,
        "other_processes": {f"{c.name()}[{c.pid}]": _vmrss_mib(c.pid) for c in others},
        "others_rss_mib": sum(_vmrss_mib(c.pid) for c in others),
        "client_rss_mib": _vmrss_mib(os.getpid()),
    }

    watched = [supervisor, *everyone]
    t2 = time.perf_counter()
    app.close()
    close_s = time.perf_counter() - t2
    # Anything that outlives close() by 10 s is a leak worth reporting; end it by pid.
    _gone, alive = psutil.wait_procs(watched, timeout=10)
    for p in alive:
        p.kill()
    return {
        "cold_start": {
            "import_s": import_s,
            "first_result_s": first,
            "second_call_s": second,
            "close_s": close_s,
            "leftover_pids_after_close": [p.pid for p in alive],
        },
        "idle_memory": memory,
    }


def measure_cold(runs: int, idle_wait: float) -> dict[str, Any]:
    """Run ``cold_one`` in ``runs`` fresh processes; medians plus the raw runs."""
    env = {k: v for k, v in os.environ.items() if k not in _NBTASK_ENV}
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nbbench-cold-") as tmp:
        for i in range(runs):
            out = Path(tmp) / f"cold{i}.json"
            cmd = [sys.executable, __file__, "--cold-one", "--idle-wait", str(idle_wait)]
            proc = subprocess.run(
                [*cmd, "--json-out", str(out)], check=False, env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise RuntimeError(f"cold-start run {i} failed with exit {proc.returncode}")
            raw.append(json.loads(out.read_text()))

    def med(section: str, key: str) -> float | None:
        vals = [r[section][key] for r in raw if r[section].get(key) is not None]
        return statistics.median(vals) if vals else None

    cold = {
        k: med("cold_start", k) for k in ("import_s", "first_result_s", "second_call_s", "close_s")
    }
    memory = {
        k: med("idle_memory", k)
        for k in (
            "supervisor_rss_mib",
            "children",
            "child_rss_max_mib",
            "child_uss_max_mib",
            "client_rss_mib",
            "others_rss_mib",
        )
    }
    return {"cold_start": cold, "idle_memory": memory, "cold_runs": raw}


# --------------------------------------------------------------------------- main


def _write(path: str | None, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    else:
        sys.stdout.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="broker for the latency/throughput/data cases")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--cold-runs", type=int, default=5, help="cold-start processes (0: skip)")
    ap.add_argument("--idle-wait", type=float, default=3.0, help="seconds idle before reading RSS")
    ap.add_argument("--profile", help="cProfile the client side of the cases into this file")
    ap.add_argument("--json-out", help="write results here (default: stdout)")
    ap.add_argument("--cold-one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cold_one:
        _write(args.json_out, cold_one(args.idle_wait))
        return 0
    out: dict[str, Any] = {}
    if args.url:
        out.update(measure_remote(args.url, args.quick, args.profile))
    if args.cold_runs > 0:
        out.update(measure_cold(args.cold_runs, args.idle_wait))
    _write(args.json_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
