"""The work a client sent to worker processes' own queues, until it ends.

Only what the client itself knows (no registry read): handles made here and ended with
the Future API, as the listener ends them when a final event arrives.
"""

from __future__ import annotations

import gc
from typing import cast

from nbtask.brokers import Store
from nbtask.client.live_workers import LiveWorkers
from nbtask.core.handle import TaskHandle
from nbtask.core.holding import holder_queue

HOLDER, OTHER = holder_queue("w1-0"), holder_queue("w2-0")


def live_workers() -> LiveWorkers:
    return LiveWorkers(cast(Store, None), "key")  # the store is not read for this


def test_work_sent_to_a_holder_counts_until_it_ends() -> None:
    live = live_workers()
    first, second = TaskHandle(None, "a", "t", HOLDER), TaskHandle(None, "b", "t", HOLDER)
    live.note_sent([first, second, TaskHandle(None, "c", "t", "default")])
    assert live.sent_to(HOLDER) and not live.sent_to(OTHER) and not live.sent_to("default")
    first.set_result(1)
    assert live.sent_to(HOLDER)  # the second still runs
    second.set_exception(RuntimeError("failed"))  # any final state ends it
    assert not live.sent_to(HOLDER)


def test_work_that_ended_out_of_order_still_counts_what_runs() -> None:
    live = live_workers()
    first, second = TaskHandle(None, "a", "t", HOLDER), TaskHandle(None, "b", "t", HOLDER)
    live.note_sent([first, second])
    second.set_result(2)
    assert live.sent_to(HOLDER)
    first.set_result(1)
    assert not live.sent_to(HOLDER)


def test_a_handle_the_notebook_let_go_is_not_kept_for_this() -> None:
    live = live_workers()
    live.note_sent([TaskHandle(None, "a", "t", HOLDER)])  # nothing else refers to it
    gc.collect()
    assert not live.sent_to(HOLDER)
