"""nbtask beside its peers, side by side, in one run on this machine.

    python benchmarks/compare.py                 # 3 interleaved rounds, full counts
    python benchmarks/compare.py --quick         # 1 round, fewer iterations (smoke)
    python benchmarks/compare.py --systems floor,nbtask,celery --rounds 5

Systems: the raw redis-py RPC floor, nbtask on Redis and on RabbitMQ, Celery (Redis
broker and backend, prefork x2), RQ (SimpleWorker x2 and the default forking Worker x2),
Dask (LocalCluster, 2 workers x 1 thread) and ipyparallel (Cluster, 2 engines). Each is a
``peer_*.py`` harness that starts its own workers, runs the same cases
(``common.run_cases`` and ``peer_common``) and stops them again; every round runs each
system once, in a fresh process, in an order rotated by one every round.

Redis: a private ``redis-server`` (no persistence) on a free port, one database per
system, stopped at the end. RabbitMQ: ``--amqp`` (guest on 127.0.0.1 by default), under
a unique prefix whose queues are deleted afterwards.

Prints the configuration, versions and a Markdown table (median [min-max] over the
rounds, ratios to the floor, the goals met or not), writes the raw JSON to
``benchmarks/results/compare-latest.json`` (git-ignored), the plots to
``docs/benchmarks/*.png`` and the table into README.md between ``<!-- compare:start -->``
and ``<!-- compare:end -->`` (``--no-docs`` leaves both alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import compare_report as report
from run import _find_redis_server, _redis_version, private_redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "compare-latest.json"
DOCS = REPO / "docs" / "benchmarks"
README = REPO / "README.md"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
ALL = [s for s, _ in report.SYSTEMS]
# Each system's database on the private Redis (nbtask on RabbitMQ keeps its results there).
DB = {"floor": 0, "nbtask": 1, "nbtask-amqp": 2, "celery": 3, "rq-simple": 4, "rq-fork": 5}


def command(system: str, redis_base: str, amqp: str, quick: bool, out: Path) -> list[str]:
    url = f"{redis_base}/{DB.get(system, 15)}"
    script, extra = {
        "floor": ("peer_floor.py", []),
        "nbtask": ("peer_nbtask.py", ["--embedded"]),
        "nbtask-amqp": ("peer_nbtask.py", ["--amqp", amqp]),
        "celery": ("peer_celery.py", []),
        "rq-simple": ("peer_rq.py", ["--worker-class", "simple"]),
        "rq-fork": ("peer_rq.py", ["--worker-class", "fork"]),
        "dask": ("peer_dask.py", []),
        "ipyparallel": ("peer_ipp.py", []),
    }[system]
    cmd = [sys.executable, str(HERE / script), "--url", url, "--json-out", str(out), *extra]
    return [*cmd, "--quick"] if quick else cmd


def child_env(system: str, redis_base: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PEER_CELERY_URL"] = f"{redis_base}/{DB['celery']}"
    env["PEER_CELERY_QUEUE"] = f"nbbench-celery-{os.getpid()}"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_one(
    system: str, redis_base: str, args: argparse.Namespace, work: Path, tag: str
) -> dict[str, Any]:
    """One harness in a fresh process (its own session); its JSON or an error record."""
    out = work / f"{tag}-{system}.json"
    log = work / f"{tag}-{system}.log"
    cmd = command(system, redis_base, args.amqp, args.quick, out)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=HERE, env=child_env(system, redis_base), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=args.timeout)
        except BaseException:
            # Timeout, Ctrl-C, SIGTERM: end the harness (it stops its workers on SIGTERM),
            # then whatever is left of the session it leads.
            _end_session(proc)
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
            rc = -1
    wall = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        print(f"    {system}: FAILED (exit {rc}) after {wall:.0f} s", file=sys.stderr)
        for line in tail:
            print(f"      {line}", file=sys.stderr)
        return {"error": f"exit {rc}", "log_tail": tail, "wall_s": wall}
    data: dict[str, Any] = json.loads(out.read_text())
    data["wall_s"] = wall
    return data


def _end_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the harness's session (it stops its workers); then kill what is left, by pid.

    Some peers start processes in sessions of their own (ipyparallel's controller and
    engines, nbtask's worker children), so the harness's descendants are noted first.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=40)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _gone, alive = psutil.wait_procs(descendants, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def rabbitmq_version(url: str) -> str:
    try:
        import kombu

        with kombu.Connection(url, connect_timeout=3) as conn:
            conn.connect()
            props = conn.connection.server_properties
            v = props.get("version", "?")
            return v.decode() if isinstance(v, bytes) else str(v)
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def git_commit() -> str:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it."""

    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _line(system: str, d: dict[str, Any]) -> str:
    if "error" in d:
        return f"{system}: error"
    lat = report.get(d, ("latency", "p50_us"))
    loop = report.get(d, ("throughput_loop", "tasks_per_s"))
    cell = report.get(d, ("cell", "remote", "reply_p50_ms"))
    return (
        f"{system}: {d['wall_s']:.0f} s; p50 {lat or 0:,.0f} \u00b5s, "
        f"loop {loop or 0:,.0f}/s, cell {cell or 0:.1f} ms"
    )


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 round, fewer iterations")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--systems", default=",".join(ALL), help=f"comma list out of {','.join(ALL)}")
    ap.add_argument("--amqp", default=AMQP, help="RabbitMQ for nbtask-amqp")
    ap.add_argument("--redis-server", default=_find_redis_server(), help="redis-server binary")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per harness process")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="raw JSON results")
    ap.add_argument("--no-docs", action="store_true", help="write neither PNGs nor README")
    ap.add_argument(
        "--render", metavar="JSON", help="measure nothing: print and write docs from this JSON"
    )
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        args.out = args.render
        return finish(saved["runs"], saved["meta"], saved["meta"]["systems"], args)
    rounds = args.rounds or (1 if args.quick else 3)
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(ALL):
        ap.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    if not args.redis_server:
        ap.error("no redis-server found; pass --redis-server PATH")
    signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.perf_counter()

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(private_redis(args.redis_server, unix=False))
        base = url.rsplit("/", 1)[0]
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nbbench-cmp-")))
        meta: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M %Z"),
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "redis_version": _redis_version(url),
            "rabbitmq_version": rabbitmq_version(args.amqp) if "nbtask-amqp" in systems else "-",
            "commit": git_commit(),
            "rounds": rounds,
            "quick": args.quick,
            "systems": systems,
        }
        print(
            f"compare: {', '.join(systems)}; {rounds} round(s){' (quick)' if args.quick else ''}; "
            f"redis {meta['redis_version']} at {url}; rabbitmq {meta['rabbitmq_version']}",
            file=sys.stderr,
        )
        runs: list[dict[str, Any]] = []
        for i in range(rounds):
            k = i % len(systems)
            order = systems[k:] + systems[:k]
            run: dict[str, Any] = {"order": order, "loadavg_before": os.getloadavg()}
            for system in order:
                elapsed = time.perf_counter() - t_start
                print(
                    f"[{elapsed:5.0f} s] round {i + 1}/{rounds}: {system} ...",
                    file=sys.stderr,
                    flush=True,
                )
                run[system] = run_one(system, base, args, work, f"r{i}")
                print(f"    {_line(system, run[system])}", file=sys.stderr, flush=True)
            runs.append(run)
            # Saved after every round: an interrupted run keeps what it measured.
            _save(Path(args.out), meta, runs, systems)

    meta["wall_s"] = time.perf_counter() - t_start
    _save(Path(args.out), meta, runs, systems)
    return finish(runs, meta, systems, args)


def _save(
    out: Path, meta: dict[str, Any], runs: list[dict[str, Any]], systems: Sequence[str]
) -> None:
    versions: dict[str, str] = {}
    for r in runs:
        for s in systems:
            for k, v in r.get(s, {}).get("versions", {}).items():
                if k != "nbtask_path":
                    versions.setdefault(k, v)
    meta["versions"] = versions
    meta["rounds_done"] = len(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")


def finish(
    runs: list[dict[str, Any]], meta: dict[str, Any], systems: list[str], args: argparse.Namespace
) -> int:
    print(f"\n## nbtask beside its peers ({meta['started']})\n")
    print(f"Machine: {meta['platform']}, {meta['cpus']} cores, Python {meta['python']}")
    print(f"Redis {meta['redis_version']}, RabbitMQ {meta['rabbitmq_version']}")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["versions"].items())))
    print(f"Rounds: {len(runs)}{' (quick counts)' if meta['quick'] else ''}\n")
    print(report.tables(runs, systems))
    print("\nGoals (ratios within this run):\n")
    print(report.goals_table(runs))
    print(f"\nraw results: {args.out}", file=sys.stderr)
    if not args.no_docs:
        subtitle = (
            f"{meta['started']}, {meta['cpus']} cores; median of {len(runs)} "
            "round(s), whiskers min-max"
        )
        for p in report.plots(runs, systems, DOCS, subtitle):
            print(f"plot: {p.relative_to(REPO)}", file=sys.stderr)
        block = report.readme_block(runs, meta, systems, "docs/benchmarks")
        README.write_text(report.replace_block(README.read_text(), block))
        print(f"README.md: table between {report.START} and {report.END}", file=sys.stderr)
    if "wall_s" in meta:
        print(f"total wall time: {meta['wall_s']:.0f} s", file=sys.stderr)
    failed = [s for r in runs for s in systems if "error" in r.get(s, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
