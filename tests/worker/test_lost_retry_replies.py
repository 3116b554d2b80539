"""A retry whose settle is sent again after its reply was lost is parked once. Both brokers.

A child settles a retry (its record RETRY, its event told, its message parked until due)
and, when that write raises, sends it again until it is stored. When the connection to
the store dropped after Redis ran it, before its reply came, and the ETA mover queued the
parked message meanwhile, the write sent again parked it a second time: the retry was
queued twice (and its RETRY event told twice). A retry is now parked once per task and
retry number.

The child's part runs in this test's process, as the child does it (its record fields and
retry message, one ``finish`` sent again), reaching the store through a
:class:`~tcp_proxy.TcpProxy` (``deafen()`` loses Redis's reply while the write reaches
it, ``cut()`` then drops the connection).
"""

from __future__ import annotations

import pytest
import redis
from helpers import RECORD_ID, wait_until
from raw_broker import RawBroker
from tcp_proxy import TcpProxy, reply_lost_once

from nbtask import App, Settings
from nbtask.brokers import Transport
from nbtask.errors import BrokerUnavailable
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType
from nbtask.wire.message import TaskMessage
from nbtask.worker.settle import Outcome, outcome_fields, retry_requeue

pytestmark = pytest.mark.brokers


def test_a_retry_settled_again_after_its_reply_was_lost_is_queued_once(
    app: App,
    access: RawBroker,
    proxied: Transport,
    store_proxy: TcpProxy,
    settings: Settings,
    r: redis.Redis,
) -> None:
    h = app.send_task(RECORD_ID, ("unused",))
    app.flush()
    wait_until(lambda: access.queued() == 1, 10, "the message on its queue")
    proxied.ensure_queues([settings.default_queue])  # as a worker does first
    assert proxied.store.link.run([("PING",)]) == [b"PONG"]  # connected, and answered on
    delivery = proxied.fetch([settings.default_queue], "test-child", 10.0)
    assert delivery is not None and delivery.task_id == h.id

    # The run ends in a retry due at once, settled as the child settles it.
    signer = Signer.for_settings(settings, settings.secret)
    envelope = signer.open(delivery.raw)
    message = TaskMessage.from_header(envelope.header)
    event = Event(EventType.RETRY, h.id, 5, {"reason": "again"}, run=message.run)
    outcome = Outcome(event, retry_in=0.0)
    raw = signer.seal(event.to_header())
    fields = outcome_fields(signer, message, outcome, raw)
    requeue = retry_requeue(signer, message, outcome, envelope.body)

    def settle() -> None:
        proxied.finish(delivery, h.id, message.client, raw, fields, requeue=requeue)

    record = access.keys.record_key(h.id)
    with (
        reply_lost_once(store_proxy, lambda: r.hget(record, "state") == b"RETRY"),
        pytest.raises(BrokerUnavailable, match="may have run it"),
    ):
        settle()
    assert proxied.move_due([settings.default_queue]) is None  # the retry queued
    wait_until(lambda: access.queued() == 1, 10, "the retry on its queue")
    settle()  # as the child's loop sends it again
    proxied.move_due([settings.default_queue])  # a second park is due at once, too
    assert r.zcard(access.keys.eta_key(settings.default_queue)) == 0
    # (On RabbitMQ the acknowledgement let this consumer be given what came after: closed,
    # it gives that back.)
    proxied.close()
    assert access.queued() == 1  # (before: 2, the retry queued twice)
    assert access.stored_event_types(signer, message.client, h.id).count("retry") == 1
