"""A Redis that stalls (stopped with SIGSTOP: it takes what is sent, says nothing back).

Unlike a Redis that is gone, a stalled one runs what it took once it wakes. So a command
whose answer did not come in time may still run: a publish is not sent again (it would
wait as long for nothing, then maybe run twice), and its handle says the task may run,
rather than that it will not. The client and a worker use the test's own redis-server.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from helpers import RECORD_ID, SECRET, ledger_runs, wait_until
from private_redis import PrivateRedis

from nbtask import App, BrokerUnavailable, Settings, TaskHandle, errors
from nbtask.brokers.redis_link import RedisLink
from nbtask.brokers.redis_streams import StreamsTransport


@pytest.fixture
def settings(private_redis: PrivateRedis, prefix: str) -> Settings:
    """The test's client and workers on its own redis-server, which it may stop."""
    return Settings(
        secret=SECRET,
        key_prefix=prefix,
        broker_url=private_redis.url,
        heartbeat_interval=0.2,
        visibility_timeout=2.0,
        result_ttl=600.0,
    )


@pytest.fixture
def admin(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    """A client of the test's redis-server, for looking at it while it answers."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


@contextlib.contextmanager
def stalled(server: PrivateRedis) -> Iterator[None]:
    """The server stopped (SIGSTOP) in the block, and running again after it."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_send_a_stalled_redis_did_not_answer_for_is_said_to_be_in_doubt_and_may_run(
    app: App, private_redis: PrivateRedis, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app.send_task(RECORD_ID, (str(ledger),))
    app.flush()  # connected, nothing owed
    with stalled(private_redis):
        h = app.send_task(RECORD_ID, (str(ledger),))  # written; Redis reads it when it wakes
        # On this thread, which owes the reply. Not revoked: the task runs once Redis wakes.
        with pytest.raises(BrokerUnavailable) as info:
            h.get(timeout=30)
    raised = info.value
    assert isinstance(raised, errors.SendUnconfirmed), repr(raised)
    assert h.id in raised.task_ids and h.id in str(raised)
    assert "may still run" in str(raised) and "send it again" in str(raised)
    assert not h.done()  # still followed: its result comes when it runs
    start_worker(concurrency=1)
    assert h.get(timeout=30) == h.id
    wait_until(lambda: len(ledger_runs(ledger)) == 2, 30, "both tasks to run")
    assert ledger_runs(ledger)[h.id] == 1


def test_a_get_reading_its_own_events_says_its_send_to_a_stalled_redis_is_in_doubt(
    app: App, private_redis: PrivateRedis, start_worker, tmp_path: Path
) -> None:
    """A get() that reads the events itself (no other reader) says so, as one that waits."""
    ledger = tmp_path / "ledger"
    start_worker(concurrency=1)
    first = app.send_task(RECORD_ID, (str(ledger),))
    assert first.get(timeout=30) == first.id  # read by this thread: the next get() reads too
    with stalled(private_redis):
        h = app.send_task(RECORD_ID, (str(ledger),))
        with pytest.raises(BrokerUnavailable) as info:
            h.get(timeout=30)
    raised = info.value
    assert isinstance(raised, errors.SendUnconfirmed), repr(raised)
    assert h.id in raised.task_ids
    assert not h.done()
    assert h.get(timeout=30) == h.id
    assert ledger_runs(ledger)[h.id] == 1


def test_a_get_reading_its_own_events_ends_for_a_send_a_full_redis_refused(
    app: App, admin: redis.Redis, start_worker, tmp_path: Path
) -> None:
    """A get() that reads the events itself (no other reader) fails at once, saying why."""
    ledger = tmp_path / "ledger"
    start_worker(concurrency=1)
    first = app.send_task(RECORD_ID, (str(ledger),))
    assert first.get(timeout=30) == first.id  # read by this thread: the next get() reads too
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # every write is refused: out of memory
    try:
        h = app.send_task(RECORD_ID, (str(ledger),))
        with pytest.raises(errors.TaskRevoked, match="not confirmed by the broker"):
            h.get(timeout=30)
    finally:
        admin.config_set("maxmemory", 0)
    assert h.id not in ledger_runs(ledger)


def connections_to(server: PrivateRedis) -> set[int]:
    """The local ports of this process's open TCP connections to ``server``."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED
    }


@contextlib.contextmanager
def stalled_until_sent_again(server: PrivateRedis, link: RedisLink) -> Iterator[None]:
    """The server stopped in the block, woken if this thread sends its command again.

    Once this thread's connection to it (made before) is dropped, the server wakes as
    soon as this process connects to it anew, as a command sent again does: the server
    then has both copies, and runs both. Else it wakes when the block ends.
    """
    assert server.process is not None
    pid = server.process.pid
    own = link._connection()._sock.getsockname()[1]  # this thread's, made before
    before = connections_to(server)
    assert own in before
    done = threading.Event()

    def sent_again() -> bool:
        now = connections_to(server)
        return own not in now and not now <= before

    def wake() -> None:
        while not done.is_set() and not sent_again():
            time.sleep(0.02)
        os.kill(pid, signal.SIGCONT)

    waker = threading.Thread(target=wake, daemon=True)
    with stalled(server):
        waker.start()
        try:
            yield
        finally:
            done.set()
            waker.join(30)


def test_a_write_a_stalled_redis_did_not_answer_is_never_sent_again(
    private_redis: PrivateRedis, admin: redis.Redis
) -> None:
    link = RedisLink(private_redis.url, "broker")
    try:
        link.run([("INCR", "runs")])  # this thread's connection is made and answered on
        with (
            stalled_until_sent_again(private_redis, link),
            pytest.raises(BrokerUnavailable, match="did not answer in time"),
            link.translate_errors(),
        ):
            link.run([("INCR", "runs")])
        # The INCR Redis took before it stalled ran once it woke, and only once.
        wait_until(lambda: admin.get("runs") == b"2", 30, "the second INCR to run")
        assert link.run([("GET", "runs")]) == [b"2"]
    finally:
        link.close()


def link_of(app: App) -> RedisLink:
    """The link of the app's Redis broker."""
    transport = app.transport
    assert isinstance(transport, StreamsTransport)
    return transport.link


def test_a_send_with_its_own_id_a_stalled_redis_did_not_answer_runs_once(
    app: App, private_redis: PrivateRedis, start_worker, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    app.send_task(RECORD_ID, (str(ledger),))
    app.flush()  # this thread's connection is made and answered on
    task_id = uuid.uuid4().hex
    # A send with its own id waits for Redis's answer (it may be refused as reused). Sent
    # again, the copy would be refused by the first one's record: the send would say the
    # id is taken by a task that has not ended, though it is its own task.
    with (
        stalled_until_sent_again(private_redis, link_of(app)),
        pytest.raises(BrokerUnavailable, match="did not answer in time"),
    ):
        app.send_task(RECORD_ID, (str(ledger),), task_id=task_id)
    start_worker(concurrency=2)
    assert app.handle(task_id).get(timeout=30) == task_id
    wait_until(lambda: len(ledger_runs(ledger)) == 2, 30, "both tasks to run")
    assert ledger_runs(ledger)[task_id] == 1


def waits(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits: for Redis's answer on a socket, or for a lock."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    # (Replies are read by redis-py, or by a poll for them and a read of the descriptor.)
    return frame.f_code.co_name == "read_from_socket" or ".poll(" in line or ".acquire(" in line


def test_close_while_another_thread_reads_its_replies_reads_none_of_them(
    private_redis: PrivateRedis, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    link = RedisLink(private_redis.url, "broker")
    raised: dict[str, BaseException | None] = {}
    lost: dict[str, bool] = {}  # whether a read of the thread's failed (gave up waiting)
    connected, stopped, sent = threading.Event(), threading.Event(), threading.Event()

    def call(name: str, step: Callable[[], object]) -> None:
        try:
            step()
        except BaseException as exc:
            raised[name] = exc
        else:
            raised[name] = None
        lost[name] = link.read_lost

    def sender() -> None:
        link.run([("PING",)])  # connected: the sends below are written without waiting
        connected.set()
        assert stopped.wait(30)
        for n in range(3):
            link.send_unanswered(("INCR", "runs"), f"task-{n}")
        sent.set()
        call("settle", link.settle_owed)  # reads the three replies itself

    thread = threading.Thread(target=sender, daemon=True)
    closer = threading.Thread(target=call, args=("close", link.close), daemon=True)
    thread.start()
    assert connected.wait(30)
    with caplog.at_level(logging.WARNING), stalled(private_redis):
        stopped.set()
        assert sent.wait(30)
        wait_until(lambda: waits(thread), 30, "the thread to wait for the replies")
        # The link closes while the thread waits for Redis's replies on its connection.
        closer.start()
        wait_until(lambda: waits(closer), 30, "the close to wait")
    thread.join(60)
    closer.join(60)
    assert not thread.is_alive() and not closer.is_alive()
    # The thread read its replies: the close took none of them from under it (the one of
    # the two left waiting for replies the other read would give up, its read lost).
    assert raised == {"settle": None, "close": None}
    assert lost == {"settle": False, "close": False}
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert admin.get("runs") == b"3"


def test_close_revokes_a_live_threads_unanswered_sends_without_a_wait_per_task(
    app: App, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """A thread still alive at ``app.close()`` sent tasks without waiting to a Redis that
    stalled: close revokes them, their handles failing rather than staying PENDING. Each
    revoke is written to the same stalled Redis, and waited for once, not once per task
    (5 s each: a close that took minutes)."""
    ledger = tmp_path / "ledger"
    handles: list[TaskHandle] = []
    ready, stopped = threading.Event(), threading.Event()
    sent, finish = threading.Event(), threading.Event()

    def run() -> None:
        handles.append(app.send_task(RECORD_ID, (str(ledger),)))  # connected, answered
        app.flush()
        ready.set()
        assert stopped.wait(30)
        handles.extend(app.send_task(RECORD_ID, (str(ledger),)) for _ in range(40))
        sent.set()
        finish.wait(300)  # alive and idle while the app closes

    thread = threading.Thread(target=run, daemon=True)
    closer = threading.Thread(target=app.close, daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        with stalled(private_redis):
            stopped.set()
            assert sent.wait(30)
            closer.start()
            closer.join(90)  # one wait for the replies, one for the revokes, and then some
            waited = closer.is_alive()
        closer.join(300)  # (Redis answers again: a close still waiting ends)
    finally:
        finish.set()
        thread.join(30)
    assert not waited, "the close still waits for the stalled Redis, a revoke at a time"
    for handle in handles[1:]:
        with pytest.raises(errors.TaskRevoked, match="before the app closed"):
            handle.get(timeout=5)
