"""Shared measurement code for the floor and nbtask harnesses.

Both harnesses implement :class:`Driver` and call :func:`run_cases`, so the two
columns of the table are measured by the very same loops and timers. The task
bodies live in each harness's ``__main__``, so both systems ship them by value.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import redis

__all__ = [
    "Config",
    "Driver",
    "delete_prefix",
    "percentile",
    "redis_cpu_reader",
    "run_cases",
    "write_json",
]

# 50 MB of float64, the size the issue and the anchor numbers use.
ARRAY_BYTES = 50_000_000


@dataclass(frozen=True)
class Config:
    """Iteration counts; ``quick()`` is the smoke-test variant."""

    latency_calls: int = 500
    latency_warmup: int = 50
    throughput_tasks: int = 5_000
    data_repeats: int = 10
    timeout: float = 120.0

    @classmethod
    def quick(cls) -> Config:
        return cls(latency_calls=200, latency_warmup=20, throughput_tasks=1_000, data_repeats=3)


class Driver(Protocol):
    """What a system under test must offer to be measured by :func:`run_cases`."""

    def call_noop(self) -> None:
        """One no-op round trip: submit and wait for the result."""

    def submit_noops_loop(self, n: int) -> Sequence[object]:
        """Submit ``n`` no-ops with one submit call each; return handles."""

    def submit_noops_batch(self, n: int) -> Sequence[object]:
        """Submit ``n`` no-ops with the system's bulk API; return handles."""

    def gather(self, handles: Sequence[object]) -> None:
        """Wait for every handle's result, in order."""

    def call_total(self, a: np.ndarray[Any, np.dtype[np.float64]]) -> float:
        """Round trip of a task returning ``float(a.sum())``."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (numpy's default 'linear')."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def redis_cpu_reader(url: str) -> Callable[[], float]:
    """A function giving the CPU seconds the Redis server at ``url`` has used so far.

    Every command a round trip makes runs on Redis's one thread, on the round trip's
    path: its share of the round trip, beside the client's and the worker's.
    """
    client = redis.Redis.from_url(url)

    def used() -> float:
        cpu: dict[str, Any] = client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    return used


def _latency(
    driver: Driver, cfg: Config, server_cpu: Callable[[], float] | None
) -> dict[str, float]:
    for _ in range(cfg.latency_warmup):
        driver.call_noop()
    samples: list[float] = []
    cpu_before = server_cpu() if server_cpu else 0.0
    for _ in range(cfg.latency_calls):
        t0 = time.perf_counter()
        driver.call_noop()
        samples.append(time.perf_counter() - t0)
    us = [s * 1e6 for s in samples]
    out = {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "mean_us": statistics.fmean(us),
    }
    if server_cpu:  # the server's CPU counts anyone else's traffic too: a quiet server
        out["redis_cpu_us"] = (server_cpu() - cpu_before) / cfg.latency_calls * 1e6
    return out


def _throughput(driver: Driver, cfg: Config, batch: bool) -> dict[str, float]:
    n = cfg.throughput_tasks
    # Timed from the first submit to the last result, like the anchor harness.
    t0 = time.perf_counter()
    handles = driver.submit_noops_batch(n) if batch else driver.submit_noops_loop(n)
    t_submitted = time.perf_counter()
    driver.gather(handles)
    elapsed = time.perf_counter() - t0
    return {
        "tasks_per_s": n / elapsed,
        "elapsed_s": elapsed,
        "submit_s": t_submitted - t0,
    }


def _data(driver: Driver, cfg: Config) -> dict[str, float]:
    a = np.random.default_rng(0).random(ARRAY_BYTES // 8)
    expected = float(a.sum())
    samples: list[float] = []
    for _ in range(cfg.data_repeats):
        t0 = time.perf_counter()
        got = driver.call_total(a)
        samples.append(time.perf_counter() - t0)
        # A benchmark that returns the wrong answer measures nothing.
        if not np.isclose(got, expected):
            raise RuntimeError(f"data case returned {got!r}, expected {expected!r}")
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "first_s": samples[0],
        "mb_per_s": ARRAY_BYTES / 1e6 / statistics.median(samples),
    }


def run_cases(
    driver: Driver, cfg: Config, server_cpu: Callable[[], float] | None = None
) -> dict[str, Any]:
    """Run latency, throughput (loop, batch) and data, in that order.

    ``server_cpu`` (see :func:`redis_cpu_reader`): the Redis server's CPU per round trip
    is measured too.
    """
    out: dict[str, Any] = {"config": asdict(cfg)}
    out["latency"] = _latency(driver, cfg, server_cpu)
    out["throughput_loop"] = _throughput(driver, cfg, batch=False)
    out["throughput_batch"] = _throughput(driver, cfg, batch=True)
    out["data_50mb"] = _data(driver, cfg)
    return out


def delete_prefix(url: str, prefix: str) -> int:
    """Delete the keys under ``prefix`` (ours only; never FLUSHDB)."""
    if not prefix or "*" in prefix:
        raise ValueError(f"refusing to delete with prefix {prefix!r}")
    r = redis.Redis.from_url(url)
    try:
        n = 0
        cursor = 0
        while True:
            # One DEL per SCAN page, so cleanup barely shows in the command counts.
            cursor, keys = r.scan(cursor, match=prefix + "*", count=1000)
            if keys:
                n += int(r.delete(*keys))
            if cursor == 0:
                return n
    finally:
        r.close()


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
