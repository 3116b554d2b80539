"""The Redis Streams transport when Redis refuses writes (full under ``noeviction``) while
a read in the same round trip is served: the entry the read delivered is never dropped.

On the test's own redis-server, whose ``maxmemory`` it changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from helpers import SECRET
from private_redis import PrivateRedis

from nbtask import App, BrokerUnavailable, Settings
from nbtask.brokers.redis_streams import StreamsTransport
from nbtask.brokers.redis_upkeep import GROUP
from nbtask.wire.events import State
from nbtask.wire.records import final_fields

ADD = "tests.sample_tasks.add"


@pytest.fixture
def settings(private_redis: PrivateRedis, prefix: str) -> Settings:
    """The test's client on its own redis-server (no worker: the test takes the messages)."""
    return Settings(secret=SECRET, key_prefix=prefix, broker_url=private_redis.url)


@pytest.fixture
def admin(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    """A client of the test's redis-server, to fill it."""
    client = redis.Redis.from_url(private_redis.url)
    client.config_set("maxmemory-policy", "noeviction")
    yield client
    client.config_set("maxmemory", 0)
    client.close()


def _finish(transport: StreamsTransport, app: App, delivery, then_fetch=None):
    """The last write of ``delivery``'s task (a made-up SUCCESS), maybe fetching after it."""
    task_id = delivery.task_id
    record = app.store.get_record(task_id)
    assert record is not None
    fields = final_fields(State.SUCCESS, b"done", time.time())
    return transport.finish(
        delivery, task_id, record.client, b"done", fields, then_fetch=then_fetch
    )


def test_the_entry_a_refused_last_writes_read_took_comes_with_its_next_write(
    app: App, admin: redis.Redis
) -> None:
    """Full: a task's last write is refused, the read sent with it takes the next entry;
    that write, once Redis has room, returns the entry (the child runs it next)."""
    transport = app.transport
    assert isinstance(transport, StreamsTransport)
    queue = [app.settings.default_queue]
    transport.ensure_queues(queue)  # (as a worker does)
    first, second = (app.send_task(ADD, (i, 1)) for i in range(2))
    app.flush()
    taken = transport.fetch(queue, "c1", 1.0)
    assert taken is not None and taken.task_id == first.id
    admin.config_set("maxmemory", 1)  # every write is refused: out of memory
    with pytest.raises(BrokerUnavailable, match=r"is full.*maxmemory"):
        _finish(transport, app, taken, then_fetch=(queue, "c1", 1.0))
    # The read sent with the refused write was served: the second message is this
    # consumer's now. The same last write, once Redis has room, hands it over.
    stream = transport.queue_key(app.settings.default_queue)
    assert admin.xpending(stream, GROUP)["pending"] == 2
    admin.config_set("maxmemory", 0)
    following = _finish(transport, app, taken)
    assert following is not None and following.task_id == second.id
    assert _finish(transport, app, following) is None
    assert transport.fetch(queue, "c1", 0.1) is None
    assert admin.xpending(stream, GROUP)["pending"] == 0
