"""What every system's harness in ``compare.py`` shares: the cases beyond ``common.run_cases``.

A harness (``peer_*.py``) is one fresh process per system and round. It implements
:class:`Peer`, and :func:`main` then runs, in this order:

1. imports, timed (``import_s``);
2. cold start: ``peer.start()`` (starting the system's workers, or its local cluster)
   to the first no-op result (``first_result_s``);
3. idle memory, ``idle_wait`` seconds later: RSS and USS of each worker process (the
   processes that run tasks) and of every process this harness started;
4. ``common.run_cases`` (round trip, throughput loop / batch, 50 MB);
5. progress: one task reports 100 updates 10 ms apart, then one reports 100 back to
   back; which updates the client saw, by the system's own mechanism (push, or a 1 ms
   poll where it has none), and how late (the task stamps each update with its
   ``time.time()``, the client notes its own on receipt; same machine, same clock);
6. a trivial notebook cell through a real kernel (jupyter_client): ``x = 1`` and the
   system's remote equivalent, interleaved in the same kernel, from the execute request
   to the execute reply;
7. ``peer.stop()``, always, and every process this harness started that is still alive
   is killed by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from common import Config, percentile, run_cases

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# The progress task: sleep LEAD (the client attaches), report N updates GAP apart,
# sleep TAIL (so a poller can see the last one), return N.
PROGRESS_N = 100
PROGRESS_GAP_S = 0.01
PROGRESS_LEAD_S = 0.1
PROGRESS_TAIL_S = 0.3
POLL_S = 0.001


@dataclass(frozen=True)
class CompareConfig:
    """Counts for one harness run; the ``common.Config`` part is shared with ``run.py``."""

    # Each system's slowest case is the 50 MB one (RQ: seconds per call): 3 per round.
    cases: Config = field(default_factory=lambda: Config(data_repeats=3))
    cell_runs: int = 100
    cell_warmup: int = 10
    idle_wait: float = 2.0

    @classmethod
    def quick(cls) -> CompareConfig:
        return cls(cases=Config.quick(), cell_runs=30, cell_warmup=5, idle_wait=1.0)


class Peer(Protocol):
    """A system under test: a ``common.Driver`` plus what the other cases need."""

    name: str

    def start(self) -> None:
        """Start the workers (or local cluster) and connect a client; the first call follows."""

    def call_noop(self) -> None: ...
    def submit_noops_loop(self, n: int) -> Sequence[object]: ...
    def submit_noops_batch(self, n: int) -> Sequence[object]: ...
    def gather(self, handles: Sequence[object]) -> None: ...
    def call_total(self, a: Any) -> float: ...

    def worker_pids(self) -> list[int]:
        """The processes that run tasks."""

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        """Run the progress task; ``(mechanism, [(index, task time, client time), ...])``."""

    def cell(self) -> tuple[dict[str, str], str, str]:
        """``(kernel environment additions, setup cell, trivial remote cell)``."""

    def versions(self) -> dict[str, str]: ...

    def stop(self) -> None:
        """Stop the client and the workers (must not raise if start() failed half way)."""


# --------------------------------------------------------------------------- helpers


def version_of(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "?"
    return out


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the benchmarks and the repository importable."""
    env = dict(os.environ)
    paths = [str(HERE), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def seen_summary(n: int, seen: list[tuple[int, float, float]]) -> dict[str, Any]:
    """How many distinct updates the client saw and their latency (ms)."""
    first: dict[int, float] = {}
    for i, t_task, t_client in seen:
        first.setdefault(i, (t_client - t_task) * 1e3)
    lat = list(first.values())
    out: dict[str, Any] = {"sent": n, "seen": len(first), "last_seen": max(first, default=None)}
    if lat:
        out.update(p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), max_ms=max(lat))
    return out


def poll_until(
    done: Callable[[], bool], read: Callable[[], tuple[int, float] | None]
) -> list[tuple[int, float, float]]:
    """Read the latest value every ``POLL_S`` until ``done()``; note each new one."""
    seen: list[tuple[int, float, float]] = []
    last: int | None = None
    while True:
        finished = done()
        value = read()
        if value is not None and value[0] != last:
            last = value[0]
            seen.append((value[0], value[1], time.time()))
        if finished:
            return seen
        time.sleep(POLL_S)


def _mem(pid: int) -> tuple[float, float] | None:
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return info.rss / 2**20, info.uss / 2**20


def idle_memory(worker_pids: Sequence[int]) -> dict[str, Any]:
    """RSS / USS (MiB) of each worker process, and of everything this process started."""
    import psutil

    workers = [m for m in (_mem(p) for p in worker_pids) if m is not None]
    others: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        m = _mem(child.pid)
        if m is not None:
            with contextlib.suppress(psutil.Error):
                others[f"{child.name()}[{child.pid}]"] = round(m[0], 1)
    return {
        "workers": len(workers),
        "worker_rss_mib": [round(r, 1) for r, _ in workers],
        "worker_uss_mib": [round(u, 1) for _, u in workers],
        "worker_rss_max_mib": max((r for r, _ in workers), default=None),
        "worker_uss_max_mib": max((u for _, u in workers), default=None),
        "started_processes": others,
        "started_rss_total_mib": sum(others.values()),
        "harness_rss_mib": (_mem(os.getpid()) or (0.0, 0.0))[0],
    }


@contextlib.contextmanager
def reap_descendants() -> Iterator[None]:
    """On the way out, kill (by pid) every process this one started that is still alive."""
    import psutil

    try:
        yield
    finally:
        with contextlib.suppress(psutil.Error):
            left = psutil.Process().children(recursive=True)
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(left, timeout=5)


def _sigterm_to_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- the cell case


def measure_cells(
    env_extra: dict[str, str], setup: str, cell: str, runs: int, warmup: int
) -> dict[str, Any]:
    """Plain ``x = 1`` and ``cell``, interleaved in one fresh kernel; ms to execute_reply."""
    from jupyter_client.manager import KernelManager

    with tempfile.TemporaryDirectory(prefix="nbbench-kernel-") as tmp:
        env = child_env(IPYTHONDIR=tmp, JUPYTER_RUNTIME_DIR=tmp, **env_extra)
        km = KernelManager(kernel_name="python3")
        t0 = time.perf_counter()
        km.start_kernel(env=env)
        kc = km.client()
        try:
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            kernel_ready_s = time.perf_counter() - t0

            def run(code: str) -> tuple[float, float]:
                t = time.perf_counter()
                msg_id = kc.execute(code, store_history=True)
                while True:
                    reply = kc.get_shell_msg(timeout=120)
                    if reply["parent_header"].get("msg_id") == msg_id:
                        break
                t_reply = time.perf_counter() - t
                content = reply["content"]
                if content["status"] != "ok":
                    raise RuntimeError(
                        f"cell failed: {code!r}: {content.get('ename')}: {content.get('evalue')}"
                    )
                while True:  # drain IOPub to this cell's idle
                    msg = kc.get_iopub_msg(timeout=120)
                    if (
                        msg["parent_header"].get("msg_id") == msg_id
                        and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"
                    ):
                        break
                return t_reply * 1e3, (time.perf_counter() - t) * 1e3

            t1 = time.perf_counter()
            run(setup)
            setup_s = time.perf_counter() - t1
            for _ in range(warmup):
                run("x = 1")
                run(cell)
            plain: list[tuple[float, float]] = []
            remote: list[tuple[float, float]] = []
            for _ in range(runs):
                plain.append(run("x = 1"))
                remote.append(run(cell))
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)

    def stats(xs: list[tuple[float, float]]) -> dict[str, float]:
        reply = [r for r, _ in xs]
        return {
            "reply_p50_ms": statistics.median(reply),
            "reply_p90_ms": percentile(reply, 90),
            "idle_p50_ms": statistics.median([i for _, i in xs]),
        }

    p, r = stats(plain), stats(remote)
    return {
        "cell": cell,
        "plain": p,
        "remote": r,
        "ratio_to_plain": r["reply_p50_ms"] / p["reply_p50_ms"],
        "kernel_ready_s": kernel_ready_s,
        "setup_cell_s": setup_s,
        "runs": runs,
    }


# --------------------------------------------------------------------------- one harness run


def measure(
    peer: Peer, cfg: CompareConfig, import_s: float, throughput_tasks: int | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": peer.name, "import_s": import_s}
    try:
        t0 = time.perf_counter()
        peer.start()
        peer.call_noop()
        out["cold_start"] = {"first_result_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        peer.call_noop()
        out["cold_start"]["second_call_s"] = time.perf_counter() - t1
        time.sleep(cfg.idle_wait)
        out["idle_memory"] = idle_memory(peer.worker_pids())
        cases = cfg.cases
        if throughput_tasks is not None:
            cases = replace(cases, throughput_tasks=throughput_tasks)
        print(f"  {peer.name}: cases", file=sys.stderr, flush=True)
        out.update(run_cases(peer, cases))
        print(f"  {peer.name}: progress", file=sys.stderr, flush=True)
        progress: dict[str, Any] = {}
        for label, gap in (("spaced", PROGRESS_GAP_S), ("burst", 0.0)):
            mechanism, seen = peer.progress(PROGRESS_N, gap)
            progress[label] = {"mechanism": mechanism, "gap_ms": gap * 1e3}
            progress[label].update(seen_summary(PROGRESS_N, seen))
        out["progress"] = progress
        print(f"  {peer.name}: notebook cell", file=sys.stderr, flush=True)
        env, setup, cell = peer.cell()
        out["cell"] = measure_cells(env, setup, cell, cfg.cell_runs, cfg.cell_warmup)
        out["versions"] = peer.versions()
    finally:
        t2 = time.perf_counter()
        peer.stop()
        out["stop_s"] = time.perf_counter() - t2
    after = getattr(peer, "after", None)
    if after is not None:
        out.update(after())
    return out


def main(
    make_peer: Callable[[argparse.Namespace], Peer],
    import_s: float,
    argv: Sequence[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    throughput_tasks: Callable[[argparse.Namespace, CompareConfig], int | None] | None = None,
) -> int:
    """Command line shared by the harnesses: ``--url URL --json-out FILE [--quick]``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="Redis for this system (a db of its own)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json-out", required=True)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    cfg = CompareConfig.quick() if args.quick else CompareConfig()
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    with reap_descendants():
        peer = make_peer(args)
        n = throughput_tasks(args, cfg) if throughput_tasks else None
        out = measure(peer, cfg, import_s, n)
    out["compare_config"] = asdict(cfg)
    Path(args.json_out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0
