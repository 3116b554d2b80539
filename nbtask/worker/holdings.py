"""A worker process's holding: what it announces, when it serves its own queue, what it drops.

It drops the values no live notebook session names any more (:mod:`nbtask.core.holding`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from nbtask.brokers import Store
from nbtask.core.datasets import DatasetCache
from nbtask.core.holding import HeldValue, Holding, naming_interval, size_of
from nbtask.errors import BrokerUnavailable
from nbtask.settings import Settings
from nbtask.wire.holdings import Held, Holdings
from nbtask.worker.journal import UNTIED

__all__ = ["ServedQueues", "process_holding"]

log = logging.getLogger("nbtask.worker")


def process_holding(
    settings: Settings,
    store: Store,
    consumer: str,
    queues: Sequence[str],
    datasets: DatasetCache,
    *,
    replaces: bool = False,
) -> tuple[Holding, ServedQueues]:
    """The holding of the process serving as ``consumer``, and the queues it serves.

    ``queues`` are the child's own queue (first, as the supervisor gives them) and the
    shared ones; ``replaces``: another process served them before (it died). Whenever the
    values it holds change, or it loads a dataset, the process rewrites its entry in the
    store: the kept values by name and size, and the datasets loaded so far.
    """
    own, *shared = queues

    def announce(values: list[HeldValue]) -> None:
        loaded = datasets.loaded()
        store.announce_holdings(
            consumer,
            Holdings(
                tuple(Held(v.name, v.size, v.made_by) for v in values),
                tuple(Held(name, size_of(value)) for name, value in sorted(loaded.items())),
            ),
        )

    holding = Holding(settings.worker_memory_budget, own, announce, store.finish_writes)

    def loaded() -> None:
        try:
            announce(holding.values())
        except Exception:  # for status only: never fail the task that loaded it
            log.exception("could not announce the datasets this process holds")

    datasets.on_load = loaded
    # A thread, not the child's loop between tasks: a child busy for days still looks, and
    # a task never waits on the look.
    threading.Thread(
        target=_drop_unnamed,
        args=(holding, store, settings.result_ttl),
        name="nbtask-unnamed",
        daemon=True,
    ).start()
    # Only a replacement can find cells sent to the process before it: a worker's first
    # children have queues no one knew of.
    grace = 3 * settings.heartbeat_interval if replaces else 0.0
    return holding, ServedQueues(own, shared, holding, grace)


def _drop_unnamed(holding: Holding, store: Store, window: float) -> None:
    """Every :func:`naming_interval`, drop the held values no live session names any more.

    One read of the store, only when some value went unused for ``window`` seconds
    (``result_ttl``): which of its namers a live session still marks. A store that cannot
    be reached drops nothing (the next look asks again).
    """
    while True:
        time.sleep(naming_interval(window))
        now = time.monotonic()
        try:
            namers = holding.idle_namers(window, now)
            if not namers:
                continue
            dropped = holding.drop_unnamed(store.named(sorted(namers)), window, now)
        except BrokerUnavailable as exc:
            log.debug("could not look for kept values no session names (%s)", exc)
            continue
        except Exception:  # never end the thread: the next look may do better
            log.exception("could not look for kept values no session names", extra=UNTIED)
            continue
        for held in dropped:
            log.info(
                "dropped %s (%d bytes, from %s) from memory: no live notebook session has "
                "named it for result_ttl (%g s); the kernel that kept it ended without "
                "releasing it",
                held.name,
                held.size,
                held.made_by or "a cell",
                window,
                extra=UNTIED,
            )


class ServedQueues:
    """The queues a child fetches from: its own one only while references may name it.

    Fetching from one queue is the fast path (the broker hands an entry to exactly one
    blocked reader); from several costs more. So a child serves its own queue only once it
    has held a value (a reference naming it exists from then on, for its whole life), and,
    when it replaced a process that died, during ``grace`` seconds after it starts: a cell
    sent to the process it replaced, before the registry showed the new one, is taken (the
    value then comes from its store copy).

    Parameters
    ----------
    own, shared
        The child's own queue and the queues every child of its worker serves.
    holding
        The child's holding.
    grace
        Seconds after start during which the own queue is served anyway.
    """

    def __init__(self, own: str, shared: Sequence[str], holding: Holding, grace: float) -> None:
        self.shared = list(shared)
        self.both = [own, *shared]
        self.holding = holding
        self._until = time.monotonic() + grace

    def __call__(self) -> list[str]:
        """The queues to fetch from now, the own one first."""
        if self.holding.ever_held or time.monotonic() < self._until:
            return self.both
        return self.shared
