"""The load test's summary (``benchmarks/bench_load.py``), from made-up runs: nothing is timed."""

from __future__ import annotations

from typing import Any

from helpers import benchmark_module

load = benchmark_module("bench_load")


def _run(broker: str, wall_s: float, worker_us: float = 400.0) -> dict[str, Any]:
    cpu = {"worker": worker_us, "clients": 500.0}
    if broker == "amqp":
        cpu["beam.smp"] = 700.0
    return {"broker": broker, "tasks": 10_000, "wall_s": wall_s, "cpu_us_per_task": cpu}


def test_the_summary_gives_median_and_spread_the_ratio_and_the_goal() -> None:
    runs = [
        _run("redis", 6.0),
        _run("amqp", 10.0, worker_us=900.0),
        _run("amqp", 8.0, worker_us=1100.0),
        _run("redis", 5.0),
        _run("redis", 7.0),
        _run("amqp", 9.5, worker_us=1000.0),
    ]
    lines = load.summary_lines(runs)
    assert "redis: 6.00 [5.00-7.00] s to the last of 10,000 results" in lines
    assert "amqp: 9.50 [8.00-10.00] s to the last of 10,000 results" in lines
    assert "  CPU per task, worker: 1000 [900-1100] µs" in lines
    assert "  CPU per task, beam.smp: 700 [700-700] µs" in lines
    assert "  CPU per task, all measured: 2200 [2100-2300] µs" in lines
    assert "  CPU per task, all measured: 900 [900-900] µs" in lines  # Redis's
    assert "RabbitMQ within 1.5x of Redis: 1.58x (NOT met)" in lines


def test_the_goal_is_met_at_one_and_a_half_times_and_needs_both_brokers() -> None:
    assert "RabbitMQ within 1.5x of Redis: 1.50x (met)" in load.summary_lines(
        [_run("redis", 4.0), _run("amqp", 6.0)]
    )
    only_amqp = load.summary_lines([_run("amqp", 6.0)])
    assert only_amqp[0] == "amqp: 6.00 s to the last of 10,000 results"
    assert not any("RabbitMQ within" in line for line in only_amqp)
