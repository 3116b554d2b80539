"""nbtask in one screen: an embedded cluster, a few tasks, their output and results.

Run it with ``python examples/quickstart.py``; nothing needs to be running first.
"""

from __future__ import annotations

import time

import nbtask
from nbtask import App

app = App("quickstart")  # no NBTASK_BROKER: starts a private Redis and 2 worker processes


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def crunch(n: int) -> float:
    """A 'heavy' task that reports progress and prints as it goes."""
    total = 0.0
    for i in range(n):
        total += sum(j * j for j in range(300_000))
        nbtask.progress(i + 1, n, f"chunk {i + 1}")
        if i % 5 == 0:
            print(f"finished chunk {i}")
    return total


@app.task
def fails() -> None:
    raise ValueError("this task fails on purpose")


def main() -> None:
    started = time.perf_counter()
    print("add(2, 3) =", add.delay(2, 3).get(timeout=30))
    elapsed = time.perf_counter() - started
    print(f"  (first result {elapsed:.2f} s after App(), cluster start included)")

    handle = crunch.delay(20)
    while not handle.done():
        progress = handle.progress
        if progress is not None:
            print(
                f"\r  crunch: {progress.done:.0f}/{progress.total:.0f} {progress.message}", end=""
            )
        time.sleep(0.05)
    print(f"\ncrunch(20) = {handle.get():.0f}")
    print("  it printed:", handle.stdout.splitlines())

    handles = add.delay_many([(i, i) for i in range(1000)])
    print("1000 additions, sum of results =", sum(h.get(timeout=60) for h in handles))

    try:
        fails.delay().get(timeout=30)
    except ValueError as exc:  # the task's own exception type
        print(f"fails() raised {type(exc).__name__}: {exc}")

    later = add.apply_async((40, 2), countdown=0.5)
    print("add(40, 2) after a 0.5 s countdown =", later.get(timeout=30))
    app.close()
    print("done: the embedded cluster has stopped")


if __name__ == "__main__":
    main()
