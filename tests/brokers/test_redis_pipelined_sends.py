"""A lone ``delay()`` does not wait for Redis's reply, and loses no task for it.

On the Redis broker the reply is the publish's; on RabbitMQ, the store's to the task's
PENDING record (RabbitMQ's confirms are tested in ``test_amqp_confirms.py``).

The publish is written to the thread's connection and its reply read later (by the
thread's next command, ``get()``, ``app.flush()`` or ``app.close()``), as RabbitMQ's
confirms are. These tests check the ways such a reply can go missing: the connection
drops with replies unread (sent again; a copy that got through is refused by the publish
script, so each task runs once), and Redis lost its scripts (sent again). The sends that
cannot be sent again (Redis out of reach, full, or answering with an error; the app closed
first) are revoked: ``test_redis_revoked_sends.py``.

The client reaches Redis through a :class:`~tcp_proxy.TcpProxy`; ``deafen()`` makes it
lose every reply on the way back while its commands still reach Redis. Workers reach
Redis directly.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import RECORD_ID, client_env, ledger_runs, wait_until
from pipelined import link_of, transport_of
from private_redis import PrivateRedis
from tcp_proxy import TcpProxy, proxying, via

from nbtask import App, Settings, State
from nbtask.brokers.redis_owed import OWED_BYTES


def each_ran_once(handles: list[Any], ledger: Path) -> None:
    """Every task of ``handles`` ended with its id as result, having run exactly once."""
    assert [h.get(timeout=30) for h in handles] == [h.id for h in handles]
    assert ledger_runs(ledger) == {h.id: 1 for h in handles}


@pytest.mark.brokers()
def test_a_loop_of_delay_does_not_wait_for_each_reply_and_each_task_runs_once(
    app: App, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD_ID, (str(ledger),))  # connects, on this thread's connection
    handles = [app.send_task(RECORD_ID, (str(ledger),)) for _ in range(50)]
    assert link_of(app).owed == 51  # each returned once written
    app.flush()
    assert link_of(app).owed == 0
    start_worker(concurrency=2)
    each_ran_once([first, *handles], ledger)


def test_replies_lost_with_their_connection_are_sent_again_and_each_task_runs_once(
    client: App, proxy: TcpProxy, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    first = client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    proxy.deafen()  # commands still reach Redis; its replies never come back
    handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(20)]
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
            first = client.send_task(RECORD_ID, (str(ledger),))
            client.flush()
            proxy.deafen()  # record writes still reach Redis; its replies never come back
            handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(10)]
            proxy.hold()  # and now the writes never reach it either
            handles += [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(10)]
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
    client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    transport = transport_of(client)
    queue_key, record_key = transport.queue_key("default"), transport.store.record_key
    proxy.deafen()
    handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5)]
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
        handles.append(client.send_task(RECORD_ID, (str(ledger),)))
        proxy.hold()  # what it sends now never reaches Redis
        handles.extend(client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5))
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


def test_a_server_that_lost_its_scripts_still_queues_the_sends_it_refused(
    private_redis: PrivateRedis, private_app, private_worker, tmp_path: Path
) -> None:
    # A server of its own: flushing the shared server's scripts would refuse the sends of
    # tests running beside this one, and a client killed before it reads its replies
    # could never send those again.
    app = private_app("scripts")
    ledger = tmp_path / "ledger"
    first = app.send_task(RECORD_ID, (str(ledger),))
    app.flush()
    server = redis.Redis.from_url(private_redis.url)
    try:
        server.script_flush()  # as after a restart of a server without persistence
    finally:
        server.close()
    handles = [app.send_task(RECORD_ID, (str(ledger),)) for _ in range(5)]  # each NOSCRIPT
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
        sent = [app.send_task({RECORD_ID!r}, ({str(ledger)!r},)).id]
        app.flush()
        redis.Redis.from_url({private_redis.url!r}).script_flush()
        sent += [app.send_task({RECORD_ID!r}, ({str(ledger)!r},)).id for _ in range(5)]
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
    first = client.send_task(RECORD_ID, (str(ledger),))
    client.flush()
    proxy.hold()  # the sends below never reach Redis: their connection drops with them
    handles = [client.send_task(RECORD_ID, (str(ledger),)) for _ in range(5)]
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
    client.send_task(RECORD_ID, ("/dev/null",))
    client.flush()
    proxy.cut()  # every connection: the pooled ones opened while connecting too
    client.send_task(RECORD_ID, ("/dev/null",))  # this thread's connection, made again
    client.flush()
    proxy.hold()  # the sends below stay on their way to Redis until released
    handles = [client.send_task(RECORD_ID, ("/dev/null",)) for _ in range(5)]
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


def test_a_loop_of_delay_over_tls_does_not_wait_either(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, tls=True)  # rediss://
    server.start()
    app = App("tls", broker=server.url, secret="tls-secret")
    admin = redis.Redis.from_url(server.url)  # another connection, which reads nothing owed
    try:
        handles = [app.send_task(RECORD_ID, (str(tmp_path / "ledger"),))]
        # Redis ran it (so its reply is on its way back) before the next send looks
        # whether the connection is still open, with a reply waiting on the socket.
        key = transport_of(app).store.record_key(handles[0].id)
        wait_until(lambda: bool(admin.exists(key)), 10, "the first task's record")
        handles += [app.send_task(RECORD_ID, (str(tmp_path / "ledger"),)) for _ in range(4)]
        app.flush()
        records = [app.store.get_record(h.id) for h in handles]
        assert [r.state if r else None for r in records] == [State.PENDING] * 5
    finally:
        admin.close()
        app.close()
        server.stop()
