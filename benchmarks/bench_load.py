"""Load test: 4 clients, 10,000 no-op tasks, one worker; on Redis and on RabbitMQ.

Each case starts ``python -m nbtask worker -b BROKER -c 2`` (random secret, its own key
prefix; on RabbitMQ ``NBTASK_RESULT_URL`` is the Redis given with ``--redis``, the result
store), waits for one no-op to come back, then starts ``--clients`` fresh client processes.
Each connects, sends one warm-up no-op, says it is ready, and on the word sends
``--tasks`` no-ops with one ``delay()`` each (the task is defined in this ``__main__``,
so it travels by value, as a notebook's does), then waits for every result in order.

Timed: from the word to the last client's last result. CPU seconds per task, over the
same window (psutil, user + system): the worker's supervisor and its children together,
the clients together, the ``redis-server`` listening on ``--redis``'s port (the broker,
or on RabbitMQ the store) and on RabbitMQ ``beam.smp``, and all of them together (on a
machine with few cores the wall time follows that total once it is CPU-bound). The
brokers alternate every round (Redis first in even rounds). Prints median [min-max] per
broker, the ratio RabbitMQ / Redis and whether it meets the goal (<= 1.5x).

    python benchmarks/bench_load.py                         # 3 rounds, both brokers
    python benchmarks/bench_load.py --rounds 1 --brokers amqp --profile-dir /tmp/prof
    PYTHONPATH=/path/to/tree python benchmarks/bench_load.py --json-out out.json

``beam.smp`` and ``redis-server`` are the ones listening on ``--amqp``'s and ``--redis``'s
ports; they serve everyone on the machine, so their CPU counts any other traffic to them
during the window (one psutil cannot see is left out). With
``--profile-dir`` py-spy records the worker (``--subprocesses``) and the first client at
2,000 Hz in raw (collapsed) form, with ``--gil`` only the threads holding the GIL
(Python's CPU, not its waits); that slows both, so the times of such a run are not
comparable with others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["GOAL_RATIO", "main", "summary_lines"]

HERE = Path(__file__).resolve().parent
#: RabbitMQ's wall time at most this many times Redis's (issue 15).
GOAL_RATIO = 1.5
BROKERS = ("redis", "amqp")
#: The name under which the summary gives every measured process's CPU per task together.
TOTAL = "all measured"


def noop() -> None:
    return None


# --------------------------------------------------------------------------- pure part


def _spread(values: Sequence[float], form: str) -> str:
    mid = form.format(statistics.median(values))
    if len(values) < 2:
        return mid
    return f"{mid} [{form.format(min(values))}-{form.format(max(values))}]"


def summary_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Median [min-max] per broker, the ratio and the goal, from runs of :func:`_case`.

    Each run has ``broker``, ``wall_s`` and ``cpu_us_per_task`` ({process group: µs}).
    """
    lines: list[str] = []
    walls: dict[str, float] = {}
    for broker in BROKERS:
        mine = [r for r in runs if r["broker"] == broker]
        if not mine:
            continue
        wall = [r["wall_s"] for r in mine]
        walls[broker] = statistics.median(wall)
        tasks = mine[0]["tasks"]
        lines.append(f"{broker}: {_spread(wall, '{:.2f}')} s to the last of {tasks:,} results")
        groups = dict.fromkeys(g for r in mine for g in r["cpu_us_per_task"])
        for group in groups:
            cpu = [r["cpu_us_per_task"][group] for r in mine if group in r["cpu_us_per_task"]]
            lines.append(f"  CPU per task, {group}: {_spread(cpu, '{:.0f}')} µs")
        if len(groups) > 1:
            total = [sum(r["cpu_us_per_task"].values()) for r in mine]
            lines.append(f"  CPU per task, {TOTAL}: {_spread(total, '{:.0f}')} µs")
    if len(walls) == len(BROKERS) and walls["redis"] > 0:
        ratio = walls["amqp"] / walls["redis"]
        met = "met" if ratio <= GOAL_RATIO else "NOT met"
        lines.append(f"ratio RabbitMQ / Redis (median wall): {ratio:.2f}x")
        lines.append(f"RabbitMQ within {GOAL_RATIO}x of Redis: {ratio:.2f}x ({met})")
    return lines


# --------------------------------------------------------------------------- one client


def client(broker: str, redis_url: str, tasks: int) -> int:
    """A client process: warm up, say ready, wait for the word, send, gather, report."""
    import psutil

    from nbtask import App

    options = {"result_url": redis_url} if broker.startswith("amqp") else {}
    app = App(
        "load",
        broker=broker,
        secret=os.environ["BENCH_SECRET"],
        key_prefix=os.environ["BENCH_PREFIX"],
        **options,
    )
    task = app.task(noop)
    task.delay().get(timeout=120)
    me = psutil.Process()
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0 = sum(me.cpu_times()[:2])
    handles = [task.delay() for _ in range(tasks)]
    sent = time.time()
    for handle in handles:
        handle.get(timeout=600)
    done = time.time()
    cpu = sum(me.cpu_times()[:2]) - cpu0
    print(json.dumps({"sent": sent, "done": done, "cpu_s": cpu}), flush=True)
    app.close()
    return 0


# --------------------------------------------------------------------------- one case


def _cpu(procs: Sequence[Any]) -> dict[int, float]:
    """User + system CPU seconds by pid (a process gone meanwhile is left out)."""
    import psutil

    out: dict[int, float] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out[p.pid] = sum(p.cpu_times()[:2])
    return out


def _tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between the snapshots by the processes alive at the second."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _by_name(name: str) -> list[Any]:
    import psutil

    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == name]


def _listening_on(url: str, name: str, default_port: int) -> list[Any]:
    """The processes called ``name`` listening on the port of ``url``."""
    import psutil

    port = urllib.parse.urlsplit(url).port or default_port
    found = []
    for p in _by_name(name):
        with contextlib.suppress(psutil.Error):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in p.net_connections("tcp")
            ):
                found.append(p)
    return found


def _spy(pid: int, out: Path, subprocesses: bool, gil: bool) -> subprocess.Popen[bytes]:
    cmd = ["py-spy", "record", "-r", "2000", "-f", "raw", "-o", str(out), "--pid", str(pid)]
    cmd += ["-s"] if subprocesses else []
    return subprocess.Popen([*cmd, *(["--gil"] if gil else [])], stdout=subprocess.DEVNULL)


def _case(kind: str, args: argparse.Namespace, tmp: Path, label: str) -> dict[str, Any]:
    from bench_nbtask import _start_worker, _stop
    from common import delete_prefix
    from peer_nbtask import delete_amqp_queues

    from nbtask import App

    broker = args.amqp if kind == "amqp" else args.redis
    prefix = f"nbload-{uuid.uuid4().hex[:12]}"
    secret = secrets.token_hex(32)
    extra = {"NBTASK_RESULT_URL": args.redis} if kind == "amqp" else {}
    log_path = tmp / f"worker-{label}.log"
    worker = _start_worker(broker, secret, prefix, log_path, extra_env=extra)
    clients: list[subprocess.Popen[str]] = []
    spies: list[subprocess.Popen[bytes]] = []
    try:
        options = {"result_url": args.redis} if kind == "amqp" else {}
        app = App("load", broker=broker, secret=secret, key_prefix=prefix, **options)
        try:
            app.task(noop).delay().get(timeout=120)  # the worker is consuming
        finally:
            app.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
        env.update(BENCH_SECRET=secret, BENCH_PREFIX=prefix)
        cmd = [sys.executable, __file__, "--client", broker, "--redis", args.redis]
        for _ in range(args.clients):
            clients.append(
                subprocess.Popen(
                    [*cmd, "--tasks", str(args.tasks)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        for c in clients:
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("a client did not start (see its stderr above)")
        beam = _listening_on(args.amqp, "beam.smp", 5672) if kind == "amqp" else []
        if args.profile_dir:
            out = Path(args.profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            spies.append(_spy(worker.pid, out / f"{label}-worker.txt", True, args.gil))
            spies.append(_spy(clients[0].pid, out / f"{label}-client.txt", False, args.gil))
            time.sleep(1.0)  # py-spy attaches
        redis_server = _listening_on(args.redis, "redis-server", 6379)

        def readings() -> dict[str, dict[int, float]]:
            # The worker's tree is read anew: a child replaced meanwhile counts too.
            return {
                "worker": _cpu(_tree(worker.pid)),
                "redis-server": _cpu(redis_server),
                "beam.smp": _cpu(beam),
            }

        before = readings()
        start = time.time()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        reports = []
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline()
            if not line:
                raise RuntimeError("a client failed (see its stderr above)")
            reports.append(json.loads(line))
        after = readings()
        for c in clients:
            c.wait(timeout=60)
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        for spy in spies[:1]:  # the worker's: ended here; the client's ends with it
            spy.send_signal(2)
        for spy in spies:
            spy.wait(timeout=60)
        _stop(worker)
        delete_prefix(args.redis, prefix + ":")
        if kind == "amqp":
            delete_amqp_queues(args.amqp, prefix)
    tasks = args.clients * args.tasks
    cpu = {
        "worker": _used(before["worker"], after["worker"]),
        "clients": sum(r["cpu_s"] for r in reports),
    }
    if after["redis-server"]:
        cpu["redis-server"] = _used(before["redis-server"], after["redis-server"])
    if kind == "amqp":
        cpu["beam.smp"] = _used(before["beam.smp"], after["beam.smp"])
    return {
        "broker": kind,
        "tasks": tasks,
        "wall_s": max(r["done"] for r in reports) - start,
        "sent_s": max(r["sent"] for r in reports) - start,
        "cpu_s": cpu,
        "cpu_us_per_task": {k: v / tasks * 1e6 for k, v in cpu.items()},
        "worker_exit_code": worker.returncode,
    }


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9", help="Redis broker/store")
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//", help="RabbitMQ")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=2_500, help="tasks per client")
    ap.add_argument("--brokers", default="redis,amqp", help="comma-separated: redis, amqp")
    ap.add_argument("--profile-dir", help="py-spy raw profiles of worker and first client")
    ap.add_argument("--gil", action="store_true", help="profile only threads holding the GIL")
    ap.add_argument("--json-out", help="write every run here")
    ap.add_argument("--client", metavar="BROKER", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client(args.client, args.redis, args.tasks)

    sys.path.insert(0, str(HERE))
    kinds = [k for k in BROKERS if k in args.brokers.split(",")]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nbload-") as tmp:
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                run = _case(kind, args, Path(tmp), f"{kind}{r}")
                runs.append(run)
                us = ", ".join(f"{k} {v:.0f}" for k, v in run["cpu_us_per_task"].items())
                print(f"round {r} {kind}: {run['wall_s']:.2f} s; CPU µs/task: {us}", flush=True)
    print("\n".join(summary_lines(runs)))
    if args.json_out:
        out = {"config": {k: v for k, v in vars(args).items() if k != "client"}, "runs": runs}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
