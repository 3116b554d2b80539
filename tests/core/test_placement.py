"""Where work on kept values goes: the holder, unless it is busy and moving the value pays.

The rule alone, on registry entries and kept values made here; the store's two answers
(is the copy there, has the holder's task ended) are recorded, so each test also shows
when the store is asked at all. ``tests/notebook/holders/test_holder_busy.py`` runs it for real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from nbtask.core.holding import holder_queue
from nbtask.core.placement import Moving, holder_queue_for
from nbtask.core.refs import ValueRef
from nbtask.wire.blobs import Part
from nbtask.wire.records import WorkerInfo

MiB = 1024 * 1024
HOLDER = holder_queue("w1-0")


def worker(number: int, *running: str, **changes: object) -> WorkerInfo:
    """Worker ``w<number>``: a child per task it runs ("" idle), child pids number*100+slot."""
    consumers = tuple(f"w{number}-{slot}" for slot in range(len(running)))
    info = WorkerInfo(
        hostname="h",
        pid=number,
        queues=("default", *(holder_queue(c) for c in consumers)),
        concurrency=len(running),
        consumers=consumers,
        busy=tuple(t for t in running if t),
        pids=tuple(number * 100 + slot for slot in range(len(running))),
        running=running,
    )
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


def kept() -> ValueRef:
    """A kept value of 10 MiB and a little, held by ``w1``'s first process."""
    value = ValueRef("x", [Part(100), Part(10 * MiB, "d1")], b"")
    value.holder, value.holder_pid = HOLDER, 100
    return value


class Store:
    """The store's answers, and what was asked."""

    def __init__(self, *, copies: bool = True, ended: tuple[str, ...] = ()) -> None:
        self.copies, self.ended_tasks = copies, ended
        self.asked: list[object] = []

    def has_copies(self, sizes: Mapping[str, int]) -> bool:
        self.asked.append(dict(sizes))
        return self.copies

    def ended(self, task_id: str) -> bool:
        self.asked.append(task_id)
        return task_id in self.ended_tasks


def place(
    registry: dict[str, WorkerInfo],
    store: Store,
    move_bytes: int = 256 * MiB,
    queue: str = "default",
    sent_to: tuple[str, ...] = (),
) -> str | None:
    """Where work reading ``kept()`` (and a plain value) goes, work going to ``queue`` else.

    ``sent_to``: the queues this client sent work to that has not ended.
    """
    rule = Moving(queue, move_bytes, store.has_copies, store.ended, sent_to.__contains__)
    return holder_queue_for([kept(), "small"], lambda: registry, (), lambda: rule)


BUSY_AND_IDLE = {"w1": worker(1, "long-task"), "w2": worker(2, "")}


@pytest.mark.parametrize(
    "registry",
    [BUSY_AND_IDLE, {"w1": worker(1, "long-task", "")}],  # idle: on another worker, or its own
)
def test_a_busy_holder_with_an_idle_process_elsewhere_sends_the_work_there(
    registry: dict[str, WorkerInfo],
) -> None:
    store = Store()
    assert place(registry, store) is None  # None: where it would go without a holder
    assert store.asked == ["long-task", {"d1": 10 * MiB}]


def test_an_idle_holder_gets_the_work_and_the_store_is_not_asked() -> None:
    store = Store()
    assert place({"w1": worker(1, ""), "w2": worker(2, "")}, store) == HOLDER
    assert store.asked == []


def test_a_holder_running_work_this_client_sent_is_busy_before_the_registry_says_so() -> None:
    # Calls sent back to back: the registry still shows the holder idle.
    store = Store()
    idle = {"w1": worker(1, ""), "w2": worker(2, "")}
    assert place(idle, store, sent_to=(HOLDER,)) is None
    assert store.asked == [{"d1": 10 * MiB}]  # no registry task to look up: only the copy
    # Work sent to another process's own queue does not make this holder busy.
    assert place(idle, Store(), sent_to=(holder_queue("w2-0"),)) == HOLDER
    # With no process idle elsewhere, the work still waits for its holder.
    assert place({"w1": worker(1, "")}, Store(), sent_to=(HOLDER,)) == HOLDER


@pytest.mark.parametrize(
    ("why", "registry", "store", "moving"),
    [
        ("over move_bytes", BUSY_AND_IDLE, Store(), {"move_bytes": 10 * MiB}),
        ("move_bytes 0", BUSY_AND_IDLE, Store(), {"move_bytes": 0}),
        ("store copy gone", BUSY_AND_IDLE, Store(copies=False), {}),
        ("holder's task ended", BUSY_AND_IDLE, Store(ended=("long-task",)), {}),
        ("the idle one serves another queue", BUSY_AND_IDLE, Store(), {"queue": "gpu"}),
        (
            "no process idle elsewhere",
            {"w1": worker(1, "long-task"), "w2": worker(2, "b")},
            Store(),
            {},
        ),
        (
            "the idle one is between children (pid 0)",
            {"w1": worker(1, "long-task"), "w2": worker(2, "", pids=(0,))},
            Store(),
            {},
        ),
        (
            "an older entry does not say who runs what",
            {"w1": worker(1, "long-task", running=()), "w2": worker(2, "")},
            Store(),
            {},
        ),
    ],
)
def test_otherwise_the_work_waits_for_its_holder(
    why: str, registry: dict[str, WorkerInfo], store: Store, moving: dict[str, Any]
) -> None:
    assert place(registry, store, **moving) == HOLDER, why


def test_without_a_rule_or_a_kept_value_nothing_is_read() -> None:
    assert holder_queue_for([kept()], lambda: BUSY_AND_IDLE) == HOLDER

    def unread() -> dict[str, WorkerInfo]:
        raise AssertionError("the registry was read for work on no kept value")

    assert holder_queue_for(["plain", ValueRef("y", [Part(5)], b"12345")], unread) is None


def test_the_values_a_busy_holder_holds_for_the_work_count_together() -> None:
    store = Store()
    rule = Moving("default", 15 * MiB, store.has_copies, store.ended, ().__contains__)
    assert holder_queue_for([kept()], lambda: BUSY_AND_IDLE, (), lambda: rule) is None
    assert holder_queue_for([kept(), kept()], lambda: BUSY_AND_IDLE, (), lambda: rule) == HOLDER
