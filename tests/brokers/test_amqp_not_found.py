"""RabbitMQ answering 404 NOT_FOUND (a queue deleted while in use) says so, not "unreachable"."""

from __future__ import annotations

import pytest

from nbtask.brokers.amqp import AmqpTransport
from nbtask.errors import BrokerUnavailable

pytestmark = pytest.mark.brokers("amqp")


def test_a_missing_queue_is_named_as_deleted_not_rabbitmq_unreachable(
    transport: AmqpTransport,
) -> None:
    name = f"{transport.queue_name('default')}-deleted"
    with pytest.raises(BrokerUnavailable) as refused, transport.links.using() as link:
        link.channel.basic_get(queue=name)
    said = str(refused.value)
    assert f"has no queue {name!r}" in said, said
    assert "404" in said and "deleted while in use" in said, said
    assert "cannot reach" not in said and "Is RabbitMQ running" not in said, said
    # The link that got the 404 is dropped; the next one works.
    with transport.links.using() as link:
        link.channel.queue_declare(queue=name, durable=True, auto_delete=False)
        link.channel.queue_delete(name)
