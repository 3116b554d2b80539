"""What ``nbtask run`` says of a background cell no worker takes: the advice to start a
worker of its queue follows only the reason that no live worker consumes it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from nbtask.client.live_workers import unserved_reason
from nbtask.notebook.cell_run import CellRun
from nbtask.notebook.run_end import _unserved
from nbtask.wire.events import State

STOPPED = (
    "its worker (host h, pid 7) is stopped (SIGSTOP, or Ctrl-Z in its terminal): it goes on "
    "once continued (kill -CONT 7, or fg there)"
)

ADVICE = " (start one: nbtask worker -Q gpu)"


def _run(queue: str, reason: str | None) -> CellRun:
    handle: Any = SimpleNamespace(queue=queue, state=State.PENDING, waiting_reason=reason)
    return CellRun(handle=cast(Any, handle), label="cell", names=())


@pytest.mark.parametrize(
    ("queue", "reason", "said"),
    [
        ("gpu", unserved_reason("gpu"), unserved_reason("gpu") + ADVICE),
        ("default", STOPPED, STOPPED),
        ("held.w1-0", unserved_reason("held.w1-0"), unserved_reason("held.w1-0")),
        ("gpu", None, None),
    ],
    ids=["unserved", "stopped-worker", "own-queue", "no-reason"],
)
def test_the_advice_to_start_a_worker_follows_only_an_unserved_queue(
    queue: str, reason: str | None, said: str | None
) -> None:
    """A stopped worker's reason got "(start one: nbtask worker -Q default)" after it."""
    assert _unserved(_run(queue, reason)) == said
