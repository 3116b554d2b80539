"""Event latency: from a worker's ``update_progress`` (or ``STARTED``) to the client's callback.

Starts ``python -m nbtask worker -b URL -c 1`` (secret and a unique key prefix in its
environment), connects an ``App`` and times four cases through ``on_event`` callbacks:

- **isolated progress**: one task reports progress 200 [100] times, 10 ms apart; each
  report carries the worker's ``time.time()``, the callback notes its own. Latency
  percentiles in ms, and the time each ``progress()`` call took in the task's thread.
- **busy progress**: the same, from a task that computes (holding the GIL) between
  reports instead of sleeping.
- **started**: 50 [20] tasks one after another (each sleeps 20 ms), each sent when the
  one before ended; latency of the ``STARTED`` event (its timestamp is taken when the
  worker begins the task). A task whose worker sent no ``STARTED`` counts as missed
  (a client that makes one from the final event, with ``seq`` 0, does not count it).
- **burst**: one task reports progress 100 times back to back, then sleeps; how many
  progress events the client saw, and that the last one it saw was the 100th.

Client and worker share the machine's clock. One worker child (``-c 1``), so each task
follows the one before in the same process, as cells run one after another do.

``--compare DIR,DIR`` runs each checkout ``--rounds`` times, interleaved (worker and
client both import that checkout's ``nbtask``), and prints them side by side; a single
run measures the ``nbtask`` its ``PYTHONPATH`` finds (``run.py`` sets it to this one).
Without ``--url`` a private ``redis-server`` is started (as ``run.py`` does).

    python benchmarks/bench_events.py --url redis://127.0.0.1:6379/9 --json-out out.json
    python benchmarks/bench_events.py --compare /path/to/main,. --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_nbtask import _NBTASK_ENV, _start_worker, _stop
from common import delete_prefix, percentile

_TIMEOUT = 60.0


def _summary(ms: Sequence[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
        "n": len(ms),
    }


# --------------------------------------------------------------------------- the tasks


def _make_tasks(app: Any) -> dict[str, Any]:
    """The benchmark's tasks, defined here so nbtask ships them by value."""

    def isolated(n: int, gap: float, lead: float) -> list[float]:
        import time

        import nbtask

        time.sleep(lead)  # lets an older client attach its callback after delay()
        spent = []
        for i in range(n):
            time.sleep(gap)
            t0 = time.perf_counter()
            nbtask.progress(i + 1, n, repr(time.time()))
            spent.append(time.perf_counter() - t0)
        return spent

    def busy(n: int, gap: float, lead: float) -> list[float]:
        import time

        import nbtask

        time.sleep(lead)
        spent = []
        for i in range(n):
            spin_until = time.perf_counter() + gap
            while time.perf_counter() < spin_until:  # computes, holding the GIL
                pass
            t0 = time.perf_counter()
            nbtask.progress(i + 1, n, repr(time.time()))
            spent.append(time.perf_counter() - t0)
        return spent

    def burst(n: int, lead: float, tail: float) -> int:
        import time

        import nbtask

        time.sleep(lead)
        for i in range(n):
            nbtask.progress(i + 1, n)
        time.sleep(tail)
        return n

    def short(seconds: float) -> None:
        import time

        time.sleep(seconds)

    return {f.__name__: app.task(f) for f in (isolated, busy, burst, short)}


class _Seen:
    """What the callback saw: ``(client time, event)`` pairs, in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        now = time.time()
        with self.lock:
            self.events.append((now, event))

    def of(self, kind: str) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.events if e.type.value == kind]


def _send(task: Any, args: tuple[Any, ...], seen: _Seen) -> Any:
    """Send with ``on_event=`` where this nbtask has it, else attach right after."""
    if "on_event" in inspect.signature(task.apply_async).parameters:
        return task.apply_async(args, on_event=seen)
    handle = task.apply_async(args)
    handle.on_event(seen)
    return handle


def _progress_case(task: Any, n: int, gap: float) -> dict[str, Any]:
    """Latency of ``n`` progress reports ``gap`` apart, and the time each call took."""
    seen = _Seen()
    spent = [s * 1e6 for s in _send(task, (n, gap, 0.1), seen).get(timeout=_TIMEOUT)]
    progress = seen.of("progress")
    return {
        **_summary([(t - float(e.data["message"])) * 1e3 for t, e in progress]),
        "sent": n,
        "seen": len(progress),
        "gap_ms": gap * 1e3,
        "progress_call_us_p50": percentile(spent, 50),
        "progress_call_us_p99": percentile(spent, 99),
        "progress_call_us_max": max(spent),
    }


def run_event_cases(app: Any, quick: bool) -> dict[str, Any]:
    """Run the cases on a connected app whose workers serve its default queue."""
    tasks = _make_tasks(app)
    n_isolated, n_started, n_burst, gap = (100, 20, 100, 0.01) if quick else (200, 50, 100, 0.01)
    tasks["short"].delay(0.0).get(timeout=_TIMEOUT)  # the worker has the code and connections

    isolated = _progress_case(tasks["isolated"], n_isolated, gap)
    busy = _progress_case(tasks["busy"], n_isolated, gap)

    started_ms: list[float] = []
    missed = 0
    for _ in range(n_started):
        seen = _Seen()
        _send(tasks["short"], (0.02,), seen).get(timeout=_TIMEOUT)
        first = [(t, e) for t, e in seen.of("started") if e.seq]  # sent by the worker
        if first:
            started_ms.append((first[0][0] - first[0][1].timestamp) * 1e3)
        else:
            missed += 1
    started = {**_summary(started_ms), "sent": n_started, "missed": missed}

    seen = _Seen()
    _send(tasks["burst"], (n_burst, 0.1, 0.3), seen).get(timeout=_TIMEOUT)
    progress = seen.of("progress")
    burst = {
        "sent": n_burst,
        "seen": len(progress),
        "last_done": progress[-1][1].data["done"] if progress else None,
    }
    return {
        "isolated_progress": isolated,
        "busy_progress": busy,
        "started": started,
        "burst": burst,
    }


# --------------------------------------------------------------------------- one checkout


def measure(url: str, result_url: str | None, quick: bool) -> dict[str, Any]:
    """Start a worker for ``url``, run the cases, stop it and delete our keys."""

    import nbtask

    prefix = f"nbbench-ev-{uuid.uuid4().hex[:12]}"
    secret = secrets.token_hex(32)
    extra = {"NBTASK_RESULT_URL": result_url} if result_url else {}
    with tempfile.TemporaryDirectory(prefix="nbbench-events-") as tmp:
        log_path = Path(tmp) / "worker.log"
        worker = _start_worker(url, secret, prefix, log_path, concurrency=1, extra_env=extra)
        app = None
        try:
            options = {"result_url": result_url} if result_url else {}
            app = nbtask.App(
                "bench-events", broker=url, secret=secret, key_prefix=prefix, **options
            )
            out = run_event_cases(app, quick)
        except BaseException:
            sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            if app is not None:
                app.close()
            _stop(worker)
            delete_prefix(result_url or url, prefix + ":")
    out["nbtask"] = str(Path(nbtask.__file__).resolve().parent.parent)
    return out


# --------------------------------------------------------------------------- comparing checkouts


def _run_one(src: Path, url: str, result_url: str | None, quick: bool, out: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in _NBTASK_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--url", url, "--json-out", str(out)]
    cmd += ["--result-url", result_url] if result_url else []
    cmd += ["--quick"] if quick else []
    proc = subprocess.run(cmd, check=False, cwd=src, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"the run on {src} failed with exit {proc.returncode}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


_ROWS: list[tuple[str, tuple[str, str], str]] = [
    ("isolated progress p50 (ms)", ("isolated_progress", "p50_ms"), ".2f"),
    ("isolated progress p99 (ms)", ("isolated_progress", "p99_ms"), ".2f"),
    ("isolated progress seen (of sent)", ("isolated_progress", "seen"), ".0f"),
    ("progress() call in the task, p50 (us)", ("isolated_progress", "progress_call_us_p50"), ".1f"),
    ("progress() call in the task, p99 (us)", ("isolated_progress", "progress_call_us_p99"), ".0f"),
    ("progress() call in the task, max (us)", ("isolated_progress", "progress_call_us_max"), ".0f"),
    ("progress from a busy task p50 (ms)", ("busy_progress", "p50_ms"), ".2f"),
    ("progress from a busy task p99 (ms)", ("busy_progress", "p99_ms"), ".2f"),
    ("progress from a busy task seen", ("busy_progress", "seen"), ".0f"),
    ("progress() call in a busy task, p50 (us)", ("busy_progress", "progress_call_us_p50"), ".1f"),
    ("STARTED p50 (ms)", ("started", "p50_ms"), ".2f"),
    ("STARTED p99 (ms)", ("started", "p99_ms"), ".2f"),
    ("STARTED missed", ("started", "missed"), ".0f"),
    ("burst: progress seen of 100", ("burst", "seen"), ".0f"),
    ("burst: last progress seen", ("burst", "last_done"), ".0f"),
]


def compare(
    srcs: Sequence[Path], rounds: int, url: str, result_url: str | None, quick: bool
) -> str:
    """Run every checkout ``rounds`` times, interleaved (order flipped each round)."""
    runs: dict[Path, list[dict[str, Any]]] = {s: [] for s in srcs}
    with tempfile.TemporaryDirectory(prefix="nbbench-events-cmp-") as tmp:
        for i in range(rounds):
            order = list(srcs) if i % 2 == 0 else list(srcs)[::-1]
            for j, src in enumerate(order):
                print(f"round {i + 1}/{rounds}: {src} ...", file=sys.stderr, flush=True)
                out = Path(tmp) / f"r{i}-{j}.json"
                runs[src].append(_run_one(src, url, result_url, quick, out))
    head = "| case | " + " | ".join(str(s) for s in srcs) + " |"
    lines = [head, "|---|" + "---|" * len(srcs)]
    for label, (section, key), fmt in _ROWS:
        cells = []
        for src in srcs:
            vals = [float(r[section][key]) for r in runs[src] if r[section].get(key) is not None]
            if not vals:
                cells.append("n/a")
                continue
            med = format(statistics.median(vals), fmt)
            spread = (
                f" [{format(min(vals), fmt)}-{format(max(vals), fmt)}]" if len(vals) > 1 else ""
            )
            cells.append(med + spread)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="broker URL (default: a private redis-server)")
    ap.add_argument("--result-url", help="the result store's Redis, for an amqp:// broker")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--json-out", help="write results here (default: stdout)")
    ap.add_argument("--compare", help="comma list of checkouts to measure side by side")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --compare")
    args = ap.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from run import _find_redis_server, private_redis

            binary = _find_redis_server()
            if binary is None:
                ap.error("no redis-server found; pass --url URL")
            url = stack.enter_context(private_redis(binary, unix=False))
        if args.compare:
            srcs = [Path(s).resolve() for s in args.compare.split(",") if s]
            print(compare(srcs, args.rounds, url, args.result_url, args.quick))
            return 0
        data = measure(url, args.result_url, args.quick)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if args.json_out:
        Path(args.json_out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
