"""A task's PENDING record that Redis writes after its start check leaves it started.

On RabbitMQ a client writes the record to Redis, then publishes the message apart. The
record's write is sent first, but Redis runs what several connections sent in the order
it reads them: on a busy machine a worker that got the message at once may have its
start check run first. Before, the PENDING written then made the running task look
unstarted, and ``revoke(terminate=True)`` marked it revoked without stopping it.

Its other fields then fill in only what is missing: a task that retried onto another
queue in the meantime keeps that queue. And a write whose connection dropped before Redis
read it is written again the same way, not refused for the record the start check made
(which then never named its client, its name nor its send). A send that failed deletes
its records, but not one a worker's start check marked: RabbitMQ took that message.
A task sent again after its worker died is set back to PENDING only while it is STARTED.
"""

from __future__ import annotations

import time
import uuid

import pytest
from raw_broker import RawBroker
from tcp_proxy import proxying, via

from nbtask.brokers import Publish, StartBy
from nbtask.brokers.handoffs import Settlement
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_store import RedisStore
from nbtask.wire.events import State
from nbtask.wire.records import final_fields

pytestmark = pytest.mark.brokers("redis")


def test_a_pending_record_written_after_the_start_check_leaves_the_task_started(
    access: RawBroker,
) -> None:
    store = access.keys
    task_id = uuid.uuid4().hex
    channel = store.channel_key(uuid.uuid4().hex[:16])
    assert store.start(task_id, StartBy("host", "1", "consumer")) == "OK"
    record = {"state": "PENDING", "client": channel, "name": "t", "queue": "default"}
    # A lone send that waits for nothing: written as new, its reply read later.
    store.write_pending([Publish("default", task_id, b"message", record)], wait=False)
    store.link.settle_owed()
    kept = store.get_record(task_id)
    assert kept is not None
    assert kept.state is State.STARTED
    raw = access.record(task_id)  # the rest of the record is written
    assert (raw[b"client"], raw[b"name"]) == (channel.encode(), b"t")
    # So a revoke sees it running (it keeps the revoke for the task's next start).
    assert store.revoke_pending(task_id, b"revoked", channel) == ""
    after = store.get_record(task_id)
    assert after is not None and after.state is State.STARTED


def test_a_new_tasks_pending_record_is_written_whole(access: RawBroker) -> None:
    store = access.keys
    task_id = uuid.uuid4().hex
    channel = store.channel_key(uuid.uuid4().hex[:16])
    record = {"state": "PENDING", "client": channel, "name": "t", "queue": "default"}
    store.write_pending([Publish("default", task_id, b"message", record)], wait=False)
    store.link.settle_owed()
    kept = store.get_record(task_id)
    assert kept is not None
    assert (kept.state, kept.client, kept.name) == (State.PENDING, channel, "t")


def test_a_late_pending_record_leaves_the_queue_a_retry_named(access: RawBroker) -> None:
    store = access.keys
    task_id = uuid.uuid4().hex
    channel = store.channel_key(uuid.uuid4().hex[:16])
    assert store.start(task_id, StartBy("host", "1", "consumer")) == "OK"
    # The task ran at once and retried onto another queue, before its record's write ran.
    retry = {**final_fields(State.RETRY, b"", time.time()), "parked": "1", "queue": "other"}
    assert store.settle(Settlement(task_id, channel, b"", retry, "default")) == ""
    record = {"state": "PENDING", "client": channel, "name": "t", "queue": "default"}
    store.write_pending([Publish("default", task_id, b"message", record)], wait=False)
    store.link.settle_owed()
    raw = access.record(task_id)
    assert (raw[b"state"], raw[b"queue"]) == (b"RETRY", b"other")
    assert (raw[b"client"], raw[b"name"]) == (channel.encode(), b"t")


def test_a_pending_record_written_again_after_the_start_check_names_its_client(
    access: RawBroker,
) -> None:
    task_id = uuid.uuid4().hex
    channel = access.keys.channel_key(uuid.uuid4().hex[:16])
    url = access.settings.result_url or access.settings.broker_url or ""
    with proxying(url, 6379) as proxy:
        store = RedisStore(RedisLink(via(url, proxy.url_port), "client"), access.settings)
        try:
            store.link.run([("PING",)])  # this thread's own connection is made
            proxy.hold()  # what it sends from now on never reaches Redis
            record = {"state": "PENDING", "client": channel, "name": "t", "queue": "default"}
            store.write_pending([Publish("default", task_id, b"message", record)], wait=False)
            # The message went apart (RabbitMQ), and a worker's start check ran first.
            assert access.keys.start(task_id, StartBy("host", "1", "consumer")) == "OK"
            proxy.cut()
            store.link.settle_owed()  # no reply: written again on a new connection
            assert store.link.take_unsent() == []
        finally:
            store.close()
    kept = access.keys.get_record(task_id)
    assert kept is not None
    assert (kept.state, kept.client, kept.name) == (State.STARTED, channel, "t")
    assert access.store.zscore(access.keys.client_tasks_key(channel), task_id) is not None


def test_a_failed_sends_record_is_deleted_unless_a_worker_started_its_task(
    access: RawBroker,
) -> None:
    """RabbitMQ may take a message whose answer is lost: the send fails, and its records
    are deleted, but one a worker's start check marked meanwhile stays (the task runs)."""
    store = access.keys
    channel = store.channel_key(uuid.uuid4().hex[:16])
    started, queued = uuid.uuid4().hex, uuid.uuid4().hex
    record = {"state": "PENDING", "client": channel, "name": "t", "queue": "default"}
    store.write_pending([Publish("default", i, b"message", record) for i in (started, queued)])
    assert store.start(started, StartBy("host", "1", "consumer")) == "OK"
    store.forget_pending([(started, channel), (queued, channel)])
    kept = store.get_record(started)
    assert kept is not None and kept.state is State.STARTED
    assert store.get_record(queued) is None
    index = store.client_tasks_key(channel)
    assert access.store.zscore(index, queued) is None
    assert access.store.zscore(index, started) is not None


def test_a_task_put_back_after_its_worker_died_keeps_an_end_stored_meanwhile(
    access: RawBroker,
) -> None:
    """A supervisor sending a dead holder's task again sets its record back to PENDING,
    but not one whose holder (paused, not dead) stored its end since."""
    store = access.keys
    lost, ended = uuid.uuid4().hex, uuid.uuid4().hex
    for task_id in (lost, ended):
        assert store.start(task_id, StartBy("host", "1", "consumer")) == "OK"
    success = final_fields(State.SUCCESS, b"outcome", time.time())
    assert store.settle(Settlement(ended, "", b"", success, "default")) == ""
    store.reset_pending(lost)
    store.reset_pending(ended)
    assert access.record(lost)[b"state"] == b"PENDING"
    assert access.record(ended)[b"state"] == b"SUCCESS"
    gone = uuid.uuid4().hex  # its record expired: none is made (it would never expire)
    store.reset_pending(gone)
    assert access.record(gone) == {}
