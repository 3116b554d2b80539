"""Raw redis-py RPC floor: the least any Redis-based task system can cost.

Two worker processes loop on ``BLPOP`` of one request list. The client
``RPUSH``es ``cloudpickle.dumps((call_id, reply_key, fn, args))`` and waits with
``BLPOP`` on a per-call reply list; the worker calls ``fn(*args)`` and
``RPUSH``es ``cloudpickle.dumps(result)`` to that list. No signing, no acks, no
events: everything nbtask adds on top of this shows up as the ratio.

Run directly (``run.py`` does this once per run)::

    python benchmarks/floor.py --url redis://127.0.0.1:6379/9 --json-out out.json
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import cloudpickle
import numpy as np
import redis
from common import Config, delete_prefix, redis_cpu_reader, run_cases, write_json

__all__ = ["FloorClient", "FloorWorkers", "main", "measure"]

StartMethod = Literal["spawn", "fork", "forkserver"]

_STOP = b"stop"
# Workers wake up this often to notice that their parent is gone.
_POLL_S = 2


def noop() -> None:
    return None


def total(a: np.ndarray[Any, np.dtype[np.float64]]) -> float:
    return float(a.sum())


def _worker_loop(url: str, request_key: str, parent_pid: int) -> None:
    r = redis.Redis.from_url(url)
    while os.getppid() == parent_pid:
        item = r.blpop([request_key], timeout=_POLL_S)
        if item is None:
            continue
        payload = item[1]
        if payload == _STOP:
            break
        _call_id, reply_key, fn, args = cloudpickle.loads(payload)
        try:
            reply = cloudpickle.dumps((True, fn(*args)))
        except Exception as exc:  # shipped back so a broken case fails loudly, not by timeout
            reply = cloudpickle.dumps((False, exc))
        r.rpush(reply_key, reply)
    r.close()


class FloorWorkers:
    """Start and stop the worker processes (context manager)."""

    def __init__(
        self, url: str, request_key: str, n: int = 2, method: StartMethod = "spawn"
    ) -> None:
        self.url = url
        self.request_key = request_key
        # typeshed types get_context(<union>) as BaseContext, which has no .Process.
        ctx: Any = mp.get_context(method)
        self.procs: list[mp.process.BaseProcess] = [
            ctx.Process(
                target=_worker_loop,
                args=(url, request_key, os.getpid()),
                name=f"floor-worker-{i}",
                daemon=True,
            )
            for i in range(n)
        ]

    def __enter__(self) -> FloorWorkers:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        r = redis.Redis.from_url(self.url)
        try:
            r.rpush(self.request_key, *[_STOP] * len(self.procs))
        finally:
            r.close()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


class FloorClient:
    """The client half: implements :class:`common.Driver`."""

    def __init__(self, url: str, prefix: str, timeout: float = 120.0) -> None:
        self.r = redis.Redis.from_url(url)
        self.request_key = prefix + "requests"
        self.prefix = prefix
        self.timeout = timeout
        self._ids = itertools.count()

    def _envelope(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, bytes]:
        call_id = next(self._ids)
        reply_key = f"{self.prefix}reply:{call_id}"
        return reply_key, cloudpickle.dumps((call_id, reply_key, fn, args))

    def submit(self, fn: Callable[..., Any], *args: Any) -> str:
        reply_key, payload = self._envelope(fn, args)
        self.r.rpush(self.request_key, payload)
        return reply_key

    def submit_many(
        self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]
    ) -> list[str]:
        pipe = self.r.pipeline(transaction=False)
        keys: list[str] = []
        for args in arg_tuples:
            reply_key, payload = self._envelope(fn, args)
            pipe.rpush(self.request_key, payload)
            keys.append(reply_key)
        pipe.execute()
        return keys

    def result(self, reply_key: str) -> Any:
        item = self.r.blpop([reply_key], timeout=self.timeout)
        if item is None:
            raise TimeoutError(f"no reply on {reply_key} after {self.timeout} s")
        ok, value = cloudpickle.loads(item[1])
        if not ok:
            raise value
        return value

    # -- common.Driver ---------------------------------------------------
    def call_noop(self) -> None:
        self.result(self.submit(noop))

    def submit_noops_loop(self, n: int) -> list[str]:
        return [self.submit(noop) for _ in range(n)]

    def submit_noops_batch(self, n: int) -> list[str]:
        return self.submit_many(noop, [() for _ in range(n)])

    def gather(self, handles: Sequence[object]) -> None:
        for key in handles:
            self.result(str(key))

    def call_total(self, a: np.ndarray[Any, np.dtype[np.float64]]) -> float:
        return float(self.result(self.submit(total, a)))

    def close(self) -> None:
        self.r.close()


def measure(
    url: str, cfg: Config, workers: int = 2, method: StartMethod = "spawn"
) -> dict[str, Any]:
    """Start the workers, run every case, delete our keys."""
    prefix = f"nbbench:floor:{uuid.uuid4().hex[:12]}:"
    client = FloorClient(url, prefix, timeout=cfg.timeout)
    t0 = time.perf_counter()
    try:
        with FloorWorkers(url, client.request_key, n=workers, method=method):
            client.call_noop()  # the workers are up once one of them answers
            startup_s = time.perf_counter() - t0
            out = run_cases(client, cfg, redis_cpu_reader(url))
    finally:
        client.close()
        leftover = delete_prefix(url, prefix)
    out["info"] = {
        "workers": workers,
        "start_method": method,
        "startup_s": startup_s,
        "keys_deleted": leftover,
    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", required=True, help="redis://host:port/db or unix:///path/redis.sock")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"])
    ap.add_argument("--json-out", help="write results here (default: print to stdout)")
    args = ap.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    method = cast(StartMethod, args.start_method)
    out = measure(args.url, cfg, workers=args.workers, method=method)
    if args.json_out:
        write_json(args.json_out, out)
    else:
        import json

        json.dump(out, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
