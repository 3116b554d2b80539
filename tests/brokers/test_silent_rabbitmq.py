"""A RabbitMQ that takes what a client sends and answers nothing, on the client's own link.

A stalled server, or a network path gone dead, looks like this (a
:class:`~tcp_proxy.TcpProxy` that ``hold()``\\ s what the client sends): the calls that
wait for its answer (a flush waiting for confirms, a send that waits for them) give up
after a few seconds with ``BrokerUnavailable`` rather than wait for ever, and the tasks
whose messages are in doubt are revoked, their handles saying so, not dropped.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from helpers import RECORD_ID
from tcp_proxy import TcpProxy, on_a_thread

from nbtask import App, State, TaskHandle
from nbtask.errors import BrokerUnavailable, TaskRevoked

pytestmark = pytest.mark.brokers("amqp")


def test_a_flush_of_a_threads_own_sends_gives_up_on_a_silent_rabbitmq(
    client: App, proxy: TcpProxy, tmp_path: Path
) -> None:
    """A thread sent tasks without waiting, then RabbitMQ went silent: the thread's own
    ``flush()`` waited for their confirms for ever. It now gives up after a few seconds;
    the tasks, in doubt, are revoked and their handles say to send them again."""
    ledger = tmp_path / "ledger"
    handles: list[TaskHandle] = []

    def send_and_flush() -> None:
        handles.append(client.send_task(RECORD_ID, (str(ledger),)))  # its own connection
        client.flush()
        proxy.hold()  # RabbitMQ gets nothing more, and so says nothing back
        handles.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(3))
        client.flush()

    raised = on_a_thread(send_and_flush, cut=proxy)
    assert isinstance(raised, BrokerUnavailable), repr(raised)
    assert "did not answer within" in str(raised) and "send them again" in str(raised)
    first, *lost = handles
    assert client.store.get_record(first.id).state is State.PENDING
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker") as info:
            handle.get(timeout=5)
        assert "did not answer in time" in str(info.value)
        assert client.store.get_record(handle.id).state is State.REVOKED


def test_a_send_that_waits_for_its_confirm_gives_up_on_a_silent_rabbitmq(
    client: App, proxy: TcpProxy, tmp_path: Path
) -> None:
    """A send that waits for RabbitMQ's confirm (one with its own ``task_id``) waited for
    ever once RabbitMQ went silent. It now raises after a few seconds, and the task, in
    doubt, is revoked: it does not run if its message reached RabbitMQ after all."""
    ledger = tmp_path / "ledger"
    task_id = str(uuid.uuid4())

    def send() -> None:
        client.send_task(RECORD_ID, (str(ledger),))
        client.flush()
        proxy.hold()
        client.send_task(RECORD_ID, (str(ledger),), task_id=task_id)

    raised = on_a_thread(send, cut=proxy)
    assert isinstance(raised, BrokerUnavailable), repr(raised)
    assert "did not answer within" in str(raised) and "send them again" in str(raised)
    record = client.store.get_record(task_id)
    assert record is not None and record.state is State.REVOKED
