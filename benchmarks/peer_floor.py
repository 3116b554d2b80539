"""The raw redis-py RPC floor (``floor.py``) as a ``compare.py`` harness.

Two spawned worker processes loop on ``BLPOP`` (``floor.FloorWorkers``); the client is
``floor.FloorClient``. Progress: the task ``PUBLISH``es each update on a channel the
client subscribed to (push). Notebook cell: a ``FloorClient`` made in the kernel's setup
cell, the cell is ``fc.call_noop()``.
"""

# The imports below start after the clock: importing the library is timed (IMPORT_S).
# ruff: noqa: E402

from __future__ import annotations

import time

_t = time.perf_counter()
import argparse
import sys
import threading
import uuid
from typing import Any

import redis
from floor import FloorClient, FloorWorkers
from peer_common import PROGRESS_LEAD_S, PROGRESS_TAIL_S, main, version_of

IMPORT_S = time.perf_counter() - _t


def report(url: str, channel: str, n: int, gap: float, lead: float, tail: float) -> int:
    import time

    import redis

    r = redis.Redis.from_url(url)
    time.sleep(lead)
    for i in range(n):
        if gap:
            time.sleep(gap)
        r.publish(channel, f"{i} {time.time()!r}")
    time.sleep(tail)
    r.close()
    return n


class FloorPeer:
    name = "floor"

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url = url
        self.prefix = f"nbbench:floor:{uuid.uuid4().hex[:12]}:"
        self.client = FloorClient(url, self.prefix, timeout=timeout)
        self.workers = FloorWorkers(url, self.client.request_key, n=2, method="spawn")
        self._entered = False

    def start(self) -> None:
        self.workers.__enter__()
        self._entered = True

    def call_noop(self) -> None:
        self.client.call_noop()

    def submit_noops_loop(self, n: int) -> list[str]:
        return self.client.submit_noops_loop(n)

    def submit_noops_batch(self, n: int) -> list[str]:
        return self.client.submit_noops_batch(n)

    def gather(self, handles: Any) -> None:
        self.client.gather(handles)

    def call_total(self, a: Any) -> float:
        return self.client.call_total(a)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers.procs if p.pid is not None]

    def progress(self, n: int, gap: float) -> tuple[str, list[tuple[int, float, float]]]:
        channel = f"{self.prefix}progress:{uuid.uuid4().hex[:8]}"
        r = redis.Redis.from_url(self.url)
        pubsub = r.pubsub()
        pubsub.subscribe(channel)
        pubsub.get_message(timeout=5)  # the subscribe confirmation
        seen: list[tuple[int, float, float]] = []
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.05)
                if msg and msg["type"] == "message":
                    now = time.time()
                    i, t = msg["data"].split()
                    seen.append((int(i), float(t), now))

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        key = self.client.submit(
            report, self.url, channel, n, gap, PROGRESS_LEAD_S, PROGRESS_TAIL_S
        )
        self.client.result(key)
        stop.set()
        thread.join()
        pubsub.close()
        r.close()
        return "push (PUBLISH/SUBSCRIBE)", seen

    def cell(self) -> tuple[dict[str, str], str, str]:
        setup = (
            "from floor import FloorClient\n"
            f"fc = FloorClient({self.url!r}, {self.prefix!r})\n"
            "fc.call_noop()"
        )
        return {}, setup, "fc.call_noop()"

    def versions(self) -> dict[str, str]:
        return version_of("redis", "cloudpickle")

    def stop(self) -> None:
        if self._entered:
            self.workers.__exit__(None, None, None)
        self.client.close()


def _make(args: argparse.Namespace) -> FloorPeer:
    return FloorPeer(args.url)


if __name__ == "__main__":
    sys.exit(main(_make, IMPORT_S))
