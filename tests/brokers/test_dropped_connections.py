"""Dropped connections and a broker outage: clients and workers carry on by themselves.

Every connection to the broker goes through a :class:`~tcp_proxy.TcpProxy` that the test
controls: ``cut()`` drops them all at once (both ends see it, as after a network blip),
``refuse()`` makes the broker unreachable until ``accept_again()``. Each test runs on the
Redis broker and on RabbitMQ; on RabbitMQ the result store (the real Redis) sits behind a
second proxy: cuts drop both at once, outages take RabbitMQ away alone and then both. The
real services are never touched.

The module's ``settings`` fixture overrides conftest's, so conftest's ``app`` and
``start_worker`` go through the proxies (workers get ``NBTASK_RESULT_URL`` from the
environment).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from helpers import AMQP_URL, SECRET, amqp_reachable, wait_until
from raw_broker import raw_broker
from tcp_proxy import TcpProxy, via

import nbtask
from nbtask import App, Settings
from nbtask.wire.events import FINAL_STATES, State, decode_event

SLOW_MARKER = "tests.sample_tasks.slow_marker"  # acks_late
SLOW_EARLY = "tests.sample_tasks.slow_early"  # early ack
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"  # early ack
ADD = "tests.sample_tasks.add"


@dataclasses.dataclass
class Route:
    """The proxies between this test's clients and workers and the real services."""

    kind: str
    broker: TcpProxy
    store: TcpProxy | None  # AMQP's result store

    @classmethod
    def open(cls, kind: str, redis_url: str) -> Route:
        target = urlsplit(redis_url if kind == "redis" else AMQP_URL)
        broker = TcpProxy(target.hostname or "127.0.0.1", target.port or 0)
        store = None
        if kind == "amqp":
            parts = urlsplit(redis_url)
            store = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
        route = cls(kind, broker, store)
        for proxy in route.proxies:
            proxy.start()
        return route

    @property
    def proxies(self) -> list[TcpProxy]:
        return [p for p in (self.broker, self.store) if p is not None]

    def urls(self, redis_url: str) -> dict[str, str]:
        """``broker_url`` (and ``result_url``) through the proxies."""
        if self.store is None:
            return {"broker_url": via(redis_url, self.broker.url_port)}
        return {
            "broker_url": via(AMQP_URL, self.broker.url_port),
            "result_url": via(redis_url, self.store.url_port),
        }

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def refuse(self) -> None:
        for proxy in self.proxies:
            proxy.refuse()

    def accept_again(self) -> None:
        for proxy in self.proxies:
            proxy.accept_again()

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()


@pytest.fixture(params=["redis", "amqp"])
def route(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Route]:
    """Proxies in front of the broker (and AMQP's result store), stopped after the test."""
    if request.param == "amqp":
        amqp_reachable()
    opened = Route.open(request.param, redis_url)
    yield opened
    opened.stop()


@pytest.fixture
def settings(
    route: Route, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings through the proxies, with short heartbeats so failures show up fast."""
    urls = route.urls(redis_url)
    if "result_url" in urls:
        monkeypatch.setenv("NBTASK_RESULT_URL", urls["result_url"])  # read by the workers
    yield Settings(
        secret=SECRET,
        key_prefix=prefix,
        heartbeat_interval=0.2,
        visibility_timeout=2.0,
        result_ttl=600.0,
        **urls,  # type: ignore[arg-type]
    )


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def final_events(app: App, task_id: str) -> set[bytes]:
    """The distinct final events of ``task_id`` kept on the client's stream."""
    finals = set()
    for raw in app.store.replay(app.channel):
        event, _ = decode_event(app.signer, raw)
        if event.task_id == task_id and event.state in FINAL_STATES:
            finals.add(raw)
    return finals


def wait_drained(route: Route, settings: Settings, redis_url: str) -> None:
    """Wait until nothing is queued, unacknowledged or parked (AMQP), seen directly."""
    if route.kind == "redis":
        direct = settings.replace(broker_url=redis_url)
    else:
        direct = settings.replace(broker_url=AMQP_URL, result_url=redis_url)
    access = raw_broker(direct)
    try:
        # (a bound on a failure only: a loaded worker settles its last deliveries late)
        wait_until(access.drained, 30, "no delivery left pending or parked")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {access.leftover()}") from None
    finally:
        access.close()


def test_cut_while_tasks_run_and_others_wait(
    app: App,
    start_worker,
    route: Route,
    settings: Settings,
    redis_url: str,
    tmp_path: Path,
) -> None:
    worker = start_worker(concurrency=3)
    late_marker, early_marker = tmp_path / "late", tmp_path / "early"
    filler_marker = tmp_path / "filler"
    late = app.send_task(SLOW_MARKER, (str(late_marker), 3.0), acks_late=True)
    early = app.send_task(SLOW_EARLY, (str(early_marker), 3.0))
    # The third child is free again soon after the cut: on AMQP it is the one that
    # receives the copies RabbitMQ gives back while the first two still run them.
    filler = app.send_task(SLOW_EARLY, (str(filler_marker), 0.5))
    markers = (late_marker, early_marker, filler_marker)
    wait_until(lambda: all(len(pids_in(m)) == 1 for m in markers), 10, "all three to start")
    queued = [app.send_task(ADD, (i, i)) for i in range(6)]  # every child is busy
    # Due after the cut: the supervisor moves it to the queue on a connection it has not
    # used since the cut.
    due_later = app.send_task(ADD, (50, 50), countdown=1.0)

    route.cut()  # every connection: the client's, its listener's, the workers'

    assert early.get(timeout=20) == pids_in(early_marker)[0]
    late_pid = late.get(timeout=20)
    assert filler.get(timeout=20) == pids_in(filler_marker)[0]
    assert [h.get(timeout=20) for h in queued] == [2 * i for i in range(6)]
    assert due_later.get(timeout=20) == 100
    assert len(pids_in(early_marker)) == 1  # early ack: never run again
    assert len(pids_in(filler_marker)) == 1
    starts = pids_in(late_marker)
    assert 1 <= len(starts) <= 2 and late_pid in starts, starts  # once, or redelivered
    for handle in (late, early, filler, *queued, due_later):
        assert app.store.get_record(handle.id).state == "SUCCESS"
        assert len(final_events(app, handle.id)) == 1, handle  # one outcome, not two runs
    wait_drained(route, settings, redis_url)

    # The same supervisor, and the same client, carry on.
    assert worker.process.poll() is None
    assert app.send_task(ADD, (20, 22)).get(timeout=10) == 42
    fresh = app.send_task(SLOW_MARKER, (str(tmp_path / "after"), 0.0), acks_late=True)
    assert fresh.get(timeout=10) in pids_in(tmp_path / "after")
    assert worker.process.poll() is None


@pytest.mark.timeout(400)  # (each reconnect under load is slow; a hang still fails)
def test_cut_again_and_again_under_load(
    app: App,
    start_worker,
    route: Route,
    settings: Settings,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Connections dropped every 0.1 s while 200 tasks flow: none lost, none run twice.

    Each cut waits for a result to come in since the one before: on a loaded machine
    connecting again can take longer than 0.1 s, and cuts always sooner than that let
    nothing through (every retry's backoff doubling up to 5 s) until the deadline."""
    worker = start_worker(concurrency=4)
    early_marker, late_marker = tmp_path / "early", tmp_path / "late"
    early, late = [], []
    for _ in range(100):
        early.append(app.send_task(SLOW_EARLY, (str(early_marker), 0.02)))
        late.append(app.send_task(SLOW_MARKER, (str(late_marker), 0.02), acks_late=True))
    handles = [*early, *late]
    done = threading.Event()
    cuts = 0

    def cut_repeatedly() -> None:
        nonlocal cuts
        seen = 0
        while not done.wait(0.1):
            ready = sum(h.ready() for h in handles)
            if ready > seen:
                route.cut()
                cuts, seen = cuts + 1, ready

    cutter = threading.Thread(target=cut_repeatedly, daemon=True)
    cutter.start()
    try:
        # (a bound on a failure only: a loaded machine makes each reconnect slow)
        wait_until(lambda: all(h.ready() for h in handles), 240, "every result")
    except AssertionError:
        pass
    finally:
        done.set()
        cutter.join()
    # Read once the cuts stopped: a cut during the read failed it, hiding what was stuck.
    stuck = {h.id: app.store.get_record(h.id) for h in handles if not h.ready()}
    assert not stuck, f"no result for {len(stuck)} task(s): {stuck}"
    assert cuts >= 5, f"only {cuts} cut(s) while the tasks ran"
    print(f"{route.kind}: connections cut {cuts} times while 200 tasks ran")
    # Early ack is at most once. On AMQP, a child whose start check's reply is lost with
    # the store's connection while its AMQP connection drops too has marked the task
    # STARTED without running it: the copy RabbitMQ gives back is settled WORKER_LOST
    # (rare; never seen on Redis, whose start check is part of the delivery).
    lost = {h.id for h in early if h.state is State.WORKER_LOST} if route.kind == "amqp" else set()
    failed = {h.id: (h.state, h.info) for h in handles if not h.successful() and h.id not in lost}
    assert not failed, failed
    assert len(pids_in(early_marker)) == 100 - len(lost)  # each ran once, a lost one never
    assert len(pids_in(late_marker)) >= 100
    finals: dict[str, set[bytes]] = {}
    for raw in app.store.replay(app.channel):
        event, _ = decode_event(app.signer, raw)
        if event.state in FINAL_STATES:
            finals.setdefault(event.task_id, set()).add(raw)
    assert {h.id: len(finals.get(h.id, ())) for h in handles} == {h.id: 1 for h in handles}
    wait_drained(route, settings, redis_url)
    assert worker.process.poll() is None
    # (its listener may be in a backoff of up to 5 s after the last cut)
    assert app.send_task(ADD, (1, 2)).get(timeout=30) == 3


def test_broker_outage_then_everyone_carries_on(
    app: App, start_worker, route: Route, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=2)
    assert app.send_task(ADD, (1, 1)).get(timeout=10) == 2  # links and listener are up
    late_marker, early_marker, never = tmp_path / "late", tmp_path / "early", tmp_path / "never"
    late = app.send_task(SLOW_MARKER, (str(late_marker), 1.0), acks_late=True)
    early = app.send_task(SLOW_EARLY, (str(early_marker), 1.0))
    wait_until(
        lambda: len(pids_in(late_marker)) == 1 and len(pids_in(early_marker)) == 1,
        10,
        "both slow tasks to start",
    )

    down = time.monotonic()
    refused_ids = []
    plain_ids: list[str | None] = []
    # RabbitMQ alone first (its store still up), then both; Redis is broker and store.
    for proxies in [[route.broker], route.proxies] if route.store else [[route.broker]]:
        for proxy in proxies:
            proxy.refuse()
        plain_ids.append(_plain_send_during_an_outage(app, never, proxies))
        refused_ids.append(uuid.uuid4().hex)
        with pytest.raises(nbtask.BrokerUnavailable) as info:
            app.send_task(SLOW_EARLY, (str(never), 0.0), task_id=refused_ids[-1])
        message = str(info.value)
        assert "cannot reach" in message
        assert f"127.0.0.1:{proxies[-1].url_port}" in message, message  # names what is down
    time.sleep(max(0.0, 3.0 - (time.monotonic() - down)))  # a few seconds of outage
    route.accept_again()

    # Tasks that were running finish and report; new ones go through the same client.
    assert late.get(timeout=20) == pids_in(late_marker)[-1]
    assert early.get(timeout=20) == pids_in(early_marker)[0]
    assert app.send_task(ADD, (2, 3)).get(timeout=20) == 5
    assert [h.get(timeout=20) for h in [app.send_task(ADD, (i, 1)) for i in range(4)]] == [
        1,
        2,
        3,
        4,
    ]
    assert len(pids_in(early_marker)) == 1
    assert len(pids_in(late_marker)) in (1, 2)
    assert len(final_events(app, late.id)) == 1
    # Nothing of the refused calls was sent: no record, and they never ran.
    assert [app.store.get_record(task_id) for task_id in refused_ids] == [None] * len(refused_ids)
    assert not never.exists()
    assert worker.process.poll() is None
    # A plain send that returned was revoked (RabbitMQ: in its store, if that was up).
    for task_id in filter(None, plain_ids):
        record = app.store.get_record(task_id)
        assert record is None or record.state is State.REVOKED, record


def _plain_send_during_an_outage(app: App, never: Path, down: list[TcpProxy]) -> str | None:
    """A plain ``delay()`` (one that does not wait for the broker's answer) as the first
    call after the services behind ``down`` went away; the id of the task if it returned.

    Whether the sending thread's connection is seen closed before the message is written
    is a race: if it is, ``delay()`` raises at once; if not, it returns and the next
    ``flush()`` raises instead, the task revoked (its handle says so).
    """
    try:
        handle = app.send_task(SLOW_EARLY, (str(never), 0.0))
    except nbtask.BrokerUnavailable as error:
        assert any(f"127.0.0.1:{proxy.url_port}" in str(error) for proxy in down), error
        return None
    with pytest.raises(nbtask.BrokerUnavailable, match="cannot reach"):
        app.flush()
    with pytest.raises(nbtask.TaskRevoked, match="not confirmed by the broker"):
        handle.get(timeout=5)
    return handle.id


@pytest.mark.parametrize("route", ["amqp"], indirect=True)
def test_a_queued_task_whose_record_the_store_lost_still_runs_on_rabbitmq(
    app: App, start_worker, route: Route, redis_url: str
) -> None:
    """RabbitMQ's durable queue keeps a task's message while the store loses its record (as
    a store restarted without persistence does): the client, back from an outage of the
    store, does not take the task for lost; it runs once a worker comes, its result arrives.
    """
    assert route.store is not None
    handle = app.send_task(ADD, (2, 3))
    app.flush()
    direct = redis.Redis.from_url(redis_url)
    try:
        assert direct.delete(app.store.record_key(handle.id)) == 1
    finally:
        direct.close()
    route.store.refuse()  # the store away while the record is missing, then back
    with pytest.raises(nbtask.BrokerUnavailable):
        app.store.get_record(handle.id)
    route.store.accept_again()
    assert app.store.get_record(handle.id) is None
    start_worker(concurrency=1)
    assert handle.get(timeout=20) == 5  # not TaskNotFound
    assert app.store.get_record(handle.id).state is State.SUCCESS


def test_client_offline_catches_up_on_missed_results(
    settings: Settings,
    start_worker,
    route: Route,
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Results that arrive while the client is cut off reach it once it is back."""
    everything = tuple(name for name in ("broker", "store") if getattr(route, name))
    _offline_client_catches_up(
        settings, start_worker, route, redis_url, tmp_path, caplog, [everything]
    )


@pytest.mark.parametrize("route", ["amqp"], indirect=True)
def test_amqp_listener_catches_up_when_the_store_comes_back_last(
    settings: Settings,
    start_worker,
    route: Route,
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RabbitMQ back first: the listener declares its reply queue again but cannot read
    what it missed from the store yet; once the store is back it must still catch up."""
    _offline_client_catches_up(
        settings, start_worker, route, redis_url, tmp_path, caplog, [("broker",), ("store",)]
    )


def _offline_client_catches_up(
    settings: Settings,
    start_worker,
    route: Route,
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    comeback: list[tuple[str, ...]],
) -> None:
    """Take a client offline while its tasks finish, then bring its proxies back a group
    at a time (``"broker"``, ``"store"``); every result must reach it."""
    start_worker(concurrency=2)
    own = Route.open(route.kind, redis_url)  # this client's own way to the broker
    client = App("offline", settings=settings.replace(**own.urls(redis_url)))
    watcher = App("watcher", settings=settings)
    try:
        marker, go = tmp_path / "marker", tmp_path / "go"
        waiting = [client.send_task(WAIT_FOR_FILE, (str(marker), str(go))) for _ in range(2)]
        queued = [client.send_task(ADD, (i, 10)) for i in range(3)]
        wait_until(lambda: len(pids_in(marker)) == 2, 10, "both tasks to start")

        own.refuse()  # the client's listener loses its channel (AMQP: its reply queue)
        go.touch()
        handles = [*waiting, *queued]
        wait_until(
            lambda: all(
                getattr(watcher.store.get_record(h.id), "state", None) is State.SUCCESS
                for h in handles
            ),
            20,
            "every task to finish while the client is offline",
        )
        # Both children take a task of another client: so each has finished telling
        # ours (into a reply queue that is gone, on AMQP), and only a catch-up can help.
        ours_done, free = tmp_path / "free", tmp_path / "go-free"
        barrier = [watcher.send_task(WAIT_FOR_FILE, (str(ours_done), str(free))) for _ in range(2)]
        wait_until(lambda: len(pids_in(ours_done)) == 2, 10, "both children to be free")
        free.touch()
        assert {h.get(timeout=10) for h in barrier} == set(pids_in(ours_done))
        assert not any(h.ready() for h in handles)  # the client could not have heard

        for group in comeback:
            back_at = time.time()
            for name in group:
                getattr(own, name).accept_again()
            still_down = [p for p in own.proxies if p not in [getattr(own, n) for n in group]]
            if group is not comeback[-1] and still_down:
                # Until the listener has tried (and failed) to read from what is still down.
                missed = functools.partial(_listener_failed_on, caplog, still_down, back_at)
                wait_until(missed, 15, "the listener to come back and miss the store")
                assert not any(h.ready() for h in handles)

        assert {h.get(timeout=20) for h in waiting} == set(pids_in(marker))
        assert [h.get(timeout=20) for h in queued] == [10, 11, 12]
        assert client.send_task(ADD, (3, 4)).get(timeout=10) == 7
    finally:
        client.close()
        watcher.close()
        own.stop()


def _listener_failed_on(
    caplog: pytest.LogCaptureFixture, proxies: list[TcpProxy], since: float
) -> bool:
    """Whether the client's listener logged a failure to reach one of ``proxies``."""
    for record in caplog.records:
        if record.name != "nbtask.client.listener" or record.created < since:
            continue
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        if any(f"127.0.0.1:{proxy.url_port}" in text for proxy in proxies):
            return True
    return False
