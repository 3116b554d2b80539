"""``app.close()`` with tasks another thread, still alive, sent and left unconfirmed.

A lone ``delay()`` returns once its message is written: RabbitMQ's confirm, or Redis's
reply to the publish, is read later (``test_amqp_confirms.py``,
``test_redis_pipelined_sends.py``). A thread still alive at ``app.close()`` may owe
them: close reads them, and revokes the tasks the broker never confirmed, on both brokers
alike. The client reaches the broker through a :class:`~tcp_proxy.TcpProxy`, whose
``hold()`` keeps what it sends from reaching the broker.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import RECORD_ID
from raw_broker import RawBroker
from tcp_proxy import TcpProxy

from nbtask import App, State
from nbtask.brokers.redis_store import RedisStore
from nbtask.errors import TaskRevoked

pytestmark = pytest.mark.brokers()


def owed_to_the_store(app: App) -> int:
    """How many replies this thread's connection to the Redis of ``app``'s records owes.

    On Redis it is the broker's connection too: the replies to the publishes.
    """
    store = app.transport.store
    assert isinstance(store, RedisStore)
    return store.link.owed


@pytest.mark.parametrize("held", [True, False], ids=["never-reached", "reached"])
def test_unconfirmed_sends_of_a_live_thread_are_revoked_when_the_app_closes(
    app: App,
    client: App,
    proxy: TcpProxy,
    access: RawBroker,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    held: bool,
) -> None:
    """A thread still alive at ``app.close()`` (idle, as a pool's is) sent tasks without
    waiting: close reads what its connection owes (RabbitMQ's confirms, Redis's replies;
    a few seconds at most) and revokes the tasks whose messages the broker never
    confirmed, naming each in the log. Their handles fail saying so, a ``get()`` waiting
    on another thread too, rather than stay PENDING; those that reached the broker stay
    queued, and nothing is said."""
    caplog.set_level(logging.ERROR, logger="nbtask")
    ledger = tmp_path / "ledger"
    handles: list[Any] = []
    sent, finish = threading.Event(), threading.Event()
    waited: list[BaseException | None] = []

    def run() -> None:
        handles.append(client.send_task(RECORD_ID, (str(ledger),)))  # its own connection
        client.flush()
        if held:
            proxy.hold()  # the messages below never reach the broker
        handles.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(3))
        sent.set()
        finish.wait(60)  # alive and idle while the app closes

    def wait() -> None:
        try:
            handles[-1].get(timeout=60)
        except BaseException as exc:  # the test looks at what it raised
            waited.append(exc)
        else:
            waited.append(None)

    thread = threading.Thread(target=run)
    thread.start()
    waiter = threading.Thread(target=wait)
    try:
        assert sent.wait(15)
        assert owed_to_the_store(client) == 0  # this thread owes nothing: the other one does
        if held:
            waiter.start()  # waits on the handle of a task the broker never confirms
        client.close()
    finally:
        finish.set()
        thread.join()
    assert access.queued() == (1 if held else 4)
    first, *lost = handles
    errors = [r.getMessage() for r in caplog.records if "not confirm" in r.getMessage()]
    if not held:
        assert errors == []
        assert [app.store.get_record(h.id).state for h in handles] == [State.PENDING] * 4
        return
    waiter.join(60)
    assert len(waited) == 1 and isinstance(waited[0], TaskRevoked), waited
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker before the app closed"):
            handle.get(timeout=5)
        assert sum(handle.id in error for error in errors) == 1, errors
    assert [app.store.get_record(h.id).state for h in lost] == [State.REVOKED] * 3
    assert app.store.get_record(first.id).state is State.PENDING
    assert first.id not in " ".join(errors)
