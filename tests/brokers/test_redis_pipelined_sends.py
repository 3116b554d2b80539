"""A lone ``delay()`` does not wait for Redis's reply, and loses no task for it.

On the Redis broker the reply is the publish's; on RabbitMQ, the store's to the task's
PENDING record (RabbitMQ's confirms are tested in ``test_amqp_confirms.py``).

The publish is written to the thread's connection and its reply read later (by the
thread's next command, ``get()``, ``app.flush()`` or ``app.close()``), as RabbitMQ's
confirms are. These tests check the ways such a reply can go missing: the connection
drops with replies unread (sent again; a copy that got through is refused by the publish
script, so each task runs once), Redis cannot be reached to send them again (revoked,
their handles fail), Redis lost its scripts (sent again), and Redis answers with an error
(reported, not dropped).

The client reaches Redis through a :class:`~tcp_proxy.TcpProxy`; ``deafen()`` makes it
lose every reply on the way back while its commands still reach Redis. Workers reach
Redis directly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import client_env, ledger_runs, wait_until
from private_redis import PrivateRedis
from tcp_proxy import TcpProxy, proxying, via

from nbtask import App, Settings, State
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_owed import OWED_BYTES
from nbtask.brokers.redis_store import RedisStore
from nbtask.brokers.redis_streams import StreamsTransport
from nbtask.errors import BrokerUnavailable, TaskRevoked

RECORD = "tests.sample_tasks.record_id"  # appends its id to a file: counts runs


def transport_of(app: App) -> StreamsTransport:
    transport = app.transport
    assert isinstance(transport, StreamsTransport)
    return transport


def link_of(app: App) -> RedisLink:
    """The link of the Redis the client writes its tasks' records to (on both brokers)."""
    store = app.transport.store
    assert isinstance(store, RedisStore)
    return store.link


def each_ran_once(handles: list[Any], ledger: Path) -> None:
    """Every task of ``handles`` ended with its id as result, having run exactly once."""
    assert [h.get(timeout=30) for h in handles] == [h.id for h in handles]
    assert ledger_runs(ledger) == {h.id: 1 for h in handles}


@pytest.mark.brokers()
def test_a_loop_of_delay_does_not_wait_for_each_reply_and_each_task_runs_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD, (str(ledger),))  # connects, on this thread's connection
    handles = [app.send_task(RECORD, (str(ledger),)) for _ in range(50)]
    assert link_of(app).owed == 51  # each returned once written
    app.flush()
    assert link_of(app).owed == 0
    start_worker(concurrency=2)
    each_ran_once([first, *handles], ledger)


def test_replies_lost_with_their_connection_are_sent_again_and_each_task_runs_once(
    client: App, proxy: TcpProxy, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD, (str(ledger),))
    client.flush()
    proxy.deafen()  # commands still reach Redis; its replies never come back
    handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(20)]
    assert link_of(client).owed == 20
    proxy.cut()

    client.flush()  # sends all 20 again on a new connection: Redis refuses each copy
    assert link_of(client).owed == 0
    assert client.transport.take_unsent() == []
    start_worker(concurrency=2)
    each_ran_once([first, *handles], ledger)


@pytest.mark.brokers("amqp")
def test_record_writes_whose_replies_were_lost_are_sent_again_and_each_task_runs_once(
    settings: Settings, start_worker, tmp_path: Path
) -> None:
    """On RabbitMQ a lone ``delay()`` writes its task's record to the store (Redis) without
    waiting for the reply, as a send on Redis does: writes whose replies were lost with
    their connection (half of them never reached Redis) are written again on a new one,
    and each task runs once."""
    ledger = tmp_path / "ledger"
    with proxying(settings.result_url or "", 6379) as proxy:
        url = via(settings.result_url or "", proxy.url_port)
        client = App("records", settings=settings.replace(result_url=url))
        try:
            first = client.send_task(RECORD, (str(ledger),))
            client.flush()
            proxy.deafen()  # record writes still reach Redis; its replies never come back
            handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(10)]
            proxy.hold()  # and now the writes never reach it either
            handles += [client.send_task(RECORD, (str(ledger),)) for _ in range(10)]
            assert link_of(client).owed == 20
            proxy.cut()

            client.flush()  # writes all 20 again on a new connection
            assert link_of(client).owed == 0
            assert client.transport.take_unsent() == []
            assert all(client.store.get_record(h.id) is not None for h in handles)
            start_worker(concurrency=2)
            each_ran_once([first, *handles], ledger)
        finally:
            client.close()


def test_copies_sent_again_of_sends_that_got_through_queue_nothing(
    client: App, proxy: TcpProxy, r: redis.Redis, tmp_path: Path
) -> None:
    """A lone send is written without looking whether a task holds its id (its sender
    just drew it); the copy sent again after its reply was lost looks, and is refused:
    one message per task on the queue, and each record as the first copy wrote it."""
    ledger = tmp_path / "ledger"
    client.send_task(RECORD, (str(ledger),))
    client.flush()
    transport = transport_of(client)
    queue_key, record_key = transport.queue_key("default"), transport.store.record_key
    proxy.deafen()
    handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(5)]
    wait_until(lambda: r.xlen(queue_key) == 6, 10, "the first copies queued")
    records = {h.id: r.hgetall(record_key(h.id)) for h in handles}
    r.hset(record_key(handles[0].id), "state", "STARTED")  # as if a worker had it
    proxy.cut()

    client.flush()  # each sent again on a new connection
    assert client.transport.take_unsent() == []
    assert r.xlen(queue_key) == 6
    assert r.hget(record_key(handles[0].id), "state") == b"STARTED"
    for handle in handles[1:]:
        assert r.hgetall(record_key(handle.id)) == records[handle.id]


def test_sends_a_thread_that_ended_left_unanswered_are_sent_again_by_the_next_flush(
    client: App, proxy: TcpProxy, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    handles: list[Any] = []
    owed: list[int] = []

    def sender() -> None:
        handles.append(client.send_task(RECORD, (str(ledger),)))
        proxy.hold()  # what it sends now never reaches Redis
        handles.extend(client.send_task(RECORD, (str(ledger),)) for _ in range(5))
        owed.append(link_of(client).owed)

    thread = threading.Thread(target=sender)
    thread.start()
    thread.join()
    assert len(handles) == 6
    assert owed[0] >= 5  # ended owing their replies (the first one's too, if it went so)
    proxy.cut()  # the held publishes are gone with their connection

    client.flush()  # this thread's: it reads what the ended thread owed, sends it again
    assert client.transport.take_unsent() == []
    start_worker(concurrency=2)
    each_ran_once(handles, ledger)


def test_sends_redis_cannot_be_reached_for_are_revoked_and_their_handles_fail(
    client: App, proxy: TcpProxy, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    client.send_task(RECORD, (str(ledger),))
    client.flush()
    proxy.deafen()
    handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(5)]
    proxy.refuse()  # the connection drops and Redis cannot be reached again

    with caplog.at_level(logging.ERROR), pytest.raises(BrokerUnavailable, match="cannot reach"):
        client.flush()
    for handle in handles:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker") as info:
            handle.get(timeout=5)
        assert handle.id in str(info.value)
    # The store is the same Redis: the log says the tasks may still run if they got there.
    assert any("may still run" in r.getMessage() for r in caplog.records)
    assert client.transport.take_unsent() == []  # each was reported once


def test_unanswered_sends_of_a_thread_that_ended_are_revoked_when_the_app_closes(
    app: App, client: App, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Two threads sent tasks without waiting and ended; Redis took them and never
    answered. ``app.close()`` reads what each thread owes, and the tasks, in doubt, are
    revoked: their handles say the send was not confirmed and to send it again, as those
    of a live thread's unanswered sends do (they ended as closed, their records left
    PENDING; the second thread's were not even read)."""
    ledger = tmp_path / "ledger"
    confirmed: list[Any] = []
    lost: list[Any] = []
    connected, held = threading.Barrier(3), threading.Event()

    def sender() -> None:
        confirmed.append(client.send_task(RECORD, (str(ledger),)))  # its own connection
        client.flush()
        connected.wait(30)
        assert held.wait(30)  # the publishes below never reach Redis, nor an answer them
        lost.extend(client.send_task(RECORD, (str(ledger),)) for _ in range(2))

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for thread in threads:
        thread.start()
    connected.wait(30)
    proxy.hold()
    held.set()
    for thread in threads:
        thread.join()
    assert len(confirmed) == 2 and len(lost) == 4
    client.close()
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker before the app closed"):
            handle.get(timeout=5)
    assert [app.store.get_record(h.id).state for h in lost] == [State.REVOKED] * 4
    assert [app.store.get_record(h.id).state for h in confirmed] == [State.PENDING] * 2


@pytest.mark.brokers("amqp")
def test_unanswered_record_writes_of_a_live_thread_are_revoked_when_the_app_closes(
    app: App, settings: Settings, tmp_path: Path
) -> None:
    """On RabbitMQ, a lone ``delay()`` writes its task's PENDING record to the store
    without waiting for Redis's reply. A thread still alive at ``app.close()`` sent tasks
    whose records Redis never answered for: close revokes them (their messages did reach
    RabbitMQ), and their handles fail saying so, rather than stay PENDING."""
    ledger = tmp_path / "ledger"
    handles: list[Any] = []
    sent, finish = threading.Event(), threading.Event()
    with proxying(settings.result_url or "", 6379) as proxy:
        url = via(settings.result_url or "", proxy.url_port)
        client = App("closing", settings=settings.replace(result_url=url))

        def run() -> None:
            handles.append(client.send_task(RECORD, (str(ledger),)))  # its own connections
            client.flush()
            proxy.hold()  # the record writes below never reach Redis
            handles.extend(client.send_task(RECORD, (str(ledger),)) for _ in range(3))
            sent.set()
            finish.wait(60)  # alive and idle while the app closes

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert sent.wait(15)
            client.close()
        finally:
            finish.set()
            thread.join()
    first, *lost = handles
    for handle in lost:
        with pytest.raises(TaskRevoked, match="not confirmed by the broker before the app closed"):
            handle.get(timeout=5)
    assert [app.store.get_record(h.id).state for h in lost] == [State.REVOKED] * 3
    assert app.store.get_record(first.id).state is State.PENDING


def test_a_server_that_lost_its_scripts_still_queues_the_sends_it_refused(
    private_redis: PrivateRedis, private_app, private_worker, tmp_path: Path
) -> None:
    # A server of its own: flushing the shared server's scripts would refuse the sends of
    # tests running beside this one, and a client killed before it reads its replies
    # could never send those again.
    app = private_app("scripts")
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD, (str(ledger),))
    app.flush()
    server = redis.Redis.from_url(private_redis.url)
    try:
        server.script_flush()  # as after a restart of a server without persistence
    finally:
        server.close()
    handles = [app.send_task(RECORD, (str(ledger),)) for _ in range(5)]  # each NOSCRIPT
    app.flush()
    assert app.transport.take_unsent() == []
    private_worker(tasks_module="tests.sample_tasks")
    each_ran_once([first, *handles], ledger)


def test_a_process_ending_without_closing_its_app_first_sends_what_redis_refused(
    private_redis: PrivateRedis,
    private_env: dict[str, str],
    private_app,
    private_worker,
    tmp_path: Path,
) -> None:
    ledger, ids = tmp_path / "ledger", tmp_path / "ids"
    script = tmp_path / "ends.py"
    script.write_text(
        textwrap.dedent(f"""
        from pathlib import Path
        import redis
        from nbtask import App, Settings
        app = App("ends", settings=Settings.from_env())
        sent = [app.send_task({RECORD!r}, ({str(ledger)!r},)).id]
        app.flush()
        redis.Redis.from_url({private_redis.url!r}).script_flush()
        sent += [app.send_task({RECORD!r}, ({str(ledger)!r},)).id for _ in range(5)]
        Path({str(ids)!r}).write_text("\\n".join(sent))
        # Ends without app.close(): the refusals are still unread.
    """)
    )
    env = dict(private_env, NBTASK_BROKER=private_redis.url)
    ended = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ended.returncode == 0, ended.stderr
    private_worker(tasks_module="tests.sample_tasks")
    later = private_app("later")
    each_ran_once([later.handle(task_id) for task_id in ids.read_text().split()], ledger)


def test_a_send_redis_answers_with_an_error_is_revoked_not_dropped(
    app: App, settings: Settings, r: redis.Redis, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app.send_task(RECORD, (str(ledger),), queue="other")
    app.flush()
    # The queue's stream replaced by another type: Redis answers the publish with an error.
    queue_key = transport_of(app).queue_key("other")
    r.delete(queue_key)
    r.set(queue_key, "not a stream")
    handle = app.send_task(RECORD, (str(ledger),), queue="other")
    assert link_of(app).owed == 1
    with caplog.at_level(logging.ERROR):
        app.flush()  # an error reply is not an outage: the call returns, the error is logged
    assert link_of(app).owed == 0
    assert any("WRONGTYPE" in r.getMessage() for r in caplog.records)
    with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
        handle.get(timeout=5)
    wait_until(
        lambda: app.store.get_record(handle.id).state is State.REVOKED, 5, "the record revoked"
    )


def test_a_loop_sending_large_arguments_keeps_few_of_them_unanswered(app: App) -> None:
    @app.task
    def size(data: bytes) -> int:
        return len(data)

    payload = b"x" * 600_000  # inline (under the blob threshold), under LARGE_BYTES
    most = 0
    handles = []
    for _ in range(60):
        handles.append(size.delay(payload))
        most = max(most, link_of(app).owed)
    # Kept to be sent again, the unanswered publishes stay near OWED_BYTES, not 60 x 600 kB.
    assert 1 < most <= OWED_BYTES // len(payload) + 1
    app.flush()
    assert link_of(app).owed == 0


@contextlib.contextmanager
def ctrl_c_after(seconds: float) -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` in this (the main) thread once, ``seconds`` from now."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_ctrl_c_while_lost_sends_are_sent_again_loses_none_of_them(
    client: App, proxy: TcpProxy, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD, (str(ledger),))
    client.flush()
    proxy.hold()  # the sends below never reach Redis: their connection drops with them
    handles = [client.send_task(RECORD, (str(ledger),)) for _ in range(5)]
    proxy.deafen(new_ones=True)  # and the connection that sends them again hears nothing
    proxy.cut()
    # flush() reads no replies (the connection dropped) and sends the five again on a new
    # connection, where it waits for Redis's answer until the user presses Ctrl-C.
    with ctrl_c_after(0.5), pytest.raises(KeyboardInterrupt):
        client.flush()
    proxy.hear()

    client.flush()  # the sends the Ctrl-C interrupted are still owed: sent again now
    assert client.transport.take_unsent() == []
    start_worker(concurrency=2)
    each_ran_once([first, *handles], ledger)


def test_a_ctrl_c_while_a_command_is_packed_is_an_exception_not_a_crash(
    settings: Settings, prefix: str
) -> None:
    # hiredis writes a number with repr(), which first runs pending signal handlers; a
    # Ctrl-C landing just then made it crash the process. The float below sends the
    # Ctrl-C itself from its repr, so that it lands there every time.
    code = textwrap.dedent(
        """
        import os, signal, sys
        from nbtask.brokers.redis_link import RedisLink

        class Interrupting(float):
            def __repr__(self):
                os.kill(os.getpid(), signal.SIGINT)
                return float.__repr__(self)

        link = RedisLink(sys.argv[1], "broker")
        try:
            link.run([("SET", sys.argv[2], Interrupting(1.5), "EX", 60)])
        except KeyboardInterrupt:
            print("interrupted")
        else:
            print("sent")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, settings.broker_url or "", f"{prefix}:packed"],
        capture_output=True,
        text=True,
        env=client_env(settings),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("interrupted", "sent")


def test_this_threads_reads_see_the_tasks_it_sent_without_waiting(
    client: App, proxy: TcpProxy
) -> None:
    client.send_task(RECORD, ("/dev/null",))
    client.flush()
    proxy.cut()  # every connection: the pooled ones opened while connecting too
    client.send_task(RECORD, ("/dev/null",))  # this thread's connection, made again
    client.flush()
    proxy.hold()  # the sends below stay on their way to Redis until released
    handles = [client.send_task(RECORD, ("/dev/null",)) for _ in range(5)]
    assert link_of(client).owed == 5
    # The record is read on another connection (redis-py's pool), which the proxy does not
    # hold: it finds the tasks only if this thread's sends are settled first.
    releaser = threading.Timer(1.0, proxy.release)
    releaser.start()
    try:
        records = [client.store.get_record(h.id) for h in handles]
    finally:
        releaser.join()
    assert [r.state if r else None for r in records] == [State.PENDING] * 5


def test_sends_a_full_redis_refuses_are_revoked_and_their_handles_fail(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app = App("full", broker=private_redis.url, secret="full-secret")
    admin = redis.Redis.from_url(private_redis.url)
    try:
        app.send_task(RECORD, (str(ledger),))
        app.flush()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write is refused: out of memory
        handles = [app.send_task(RECORD, (str(ledger),)) for _ in range(3)]
        assert link_of(app).owed == 3
        # Redis refuses each publish, then the revoke too: the handles fail all the same,
        # and the log says why, and what to do.
        with caplog.at_level(logging.ERROR):
            app.flush()
        for handle in handles:
            with pytest.raises(TaskRevoked, match="not confirmed by the broker"):
                handle.get(timeout=5)
        messages = [r.getMessage() for r in caplog.records]
        assert any("is full" in m and "maxmemory" in m for m in messages), messages
        # A send that waits for Redis's answer says so at once.
        with pytest.raises(BrokerUnavailable, match=r"is full.*maxmemory"):
            app.send_task(RECORD, (str(ledger),), task_id=uuid.uuid4().hex)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        app.close()


def test_a_loop_of_delay_over_tls_does_not_wait_either(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, tls=True)  # rediss://
    server.start()
    app = App("tls", broker=server.url, secret="tls-secret")
    admin = redis.Redis.from_url(server.url)  # another connection, which reads nothing owed
    try:
        handles = [app.send_task(RECORD, (str(tmp_path / "ledger"),))]
        # Redis ran it (so its reply is on its way back) before the next send looks
        # whether the connection is still open, with a reply waiting on the socket.
        key = transport_of(app).store.record_key(handles[0].id)
        wait_until(lambda: bool(admin.exists(key)), 10, "the first task's record")
        handles += [app.send_task(RECORD, (str(tmp_path / "ledger"),)) for _ in range(4)]
        app.flush()
        records = [app.store.get_record(h.id) for h in handles]
        assert [r.state if r else None for r in records] == [State.PENDING] * 5
    finally:
        admin.close()
        app.close()
        server.stop()
