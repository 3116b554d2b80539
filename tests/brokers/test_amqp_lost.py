"""RabbitMQ only: the parked lost deliveries a supervisor claims before settling them."""

from __future__ import annotations

import pytest

from nbtask import App
from nbtask.brokers.amqp_lost import LostDeliveries
from nbtask.brokers.redis_store import RedisStore

pytestmark = pytest.mark.brokers("amqp")


def test_a_claim_cut_short_is_taken_again_at_once_by_its_claimant_only(app: App) -> None:
    """A supervisor whose connection drops between claim and settle settles once back.

    The lease keeps any other supervisor off the claim; without the claimant's own
    retake, the delivery would wait out the lease (30 s) before anyone settled it.
    """
    assert isinstance(app.store, RedisStore)
    mine, other = LostDeliveries(app.store), LostDeliveries(app.store)
    mine.park("t-lost", b"signed message", "default", 1)
    [claimed] = mine.claim(None, ["default"])
    assert (claimed.task_id, claimed.raw, claimed.deliveries) == ("t-lost", b"signed message", 1)

    # Its settlement never happened (the connection dropped): others keep off ...
    assert other.waiting() == 0
    assert other.claim(None, ["default"]) == []
    # ... and the claimant takes it again on its next round, then settles it.
    assert mine.waiting() == 1
    [again] = mine.claim(None, ["default"])
    assert again.task_id == "t-lost"
    assert mine.settle(again)
    assert mine.waiting() == 0 and other.waiting() == 0
    assert mine.claim(None, ["default"]) == [] and other.claim(None, ["default"]) == []
