"""A worker process's holding: what it announces, and when it serves its own queue."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from nbtask.brokers import Store
from nbtask.core.datasets import DatasetCache
from nbtask.core.holding import HeldValue, Holding, size_of
from nbtask.settings import Settings
from nbtask.wire.holdings import Held, Holdings

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
    # Only a replacement can find cells sent to the process before it: a worker's first
    # children have queues no one knew of.
    grace = 3 * settings.heartbeat_interval if replaces else 0.0
    return holding, ServedQueues(own, shared, holding, grace)


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
