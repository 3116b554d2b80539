"""Malformed bookkeeping, generated: the supervisor's housekeeping, the client's listener
and the CLI read whatever anyone with Redis access can write there, and keep working.

In-process on the real Redis (the store of both brokers); each example writes under a
key prefix of its own.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator

import pytest
import redis
from helpers import SECRET, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbtask import Settings
from nbtask.brokers import open_broker
from nbtask.cli import main
from nbtask.client.listener import Listener
from nbtask.core.handle import TaskHandle
from nbtask.wire.envelope import Signer
from nbtask.wire.events import Event, EventType
from nbtask.worker.supervisor import Worker

junk = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=32).map(str.encode),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"\xff\xfe", b"[" * 5000, b'{"pid": "x"}']),
)
examples = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextlib.contextmanager
def fresh_prefix(server: redis.Redis, redis_url: str) -> Iterator[Settings]:
    name = f"{uuid.uuid4().hex[:10]}"
    prefix = f"nbfuzz-{name}"
    try:
        yield Settings(broker_url=redis_url, secret=SECRET, key_prefix=prefix)
    finally:
        keys = list(server.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            server.delete(*keys)


@examples
@given(
    registry=st.dictionaries(junk, junk, max_size=4),
    members=st.lists(junk, max_size=4),
    record=st.dictionaries(st.sampled_from([b"state", b"client", b"name", b"x"]), junk),
)
def test_supervisor_housekeeping_survives_junk(
    r: redis.Redis,
    redis_url: str,
    registry: dict[bytes, bytes],
    members: list[bytes],
    record: dict[bytes, bytes],
) -> None:
    with fresh_prefix(r, redis_url) as config:
        p = config.key_prefix
        if registry:
            r.hset(f"{p}:workers", mapping=registry)
        for member in members:
            r.zadd(f"{p}:eta:default", {member: 0})
        if record:
            r.hset(f"{p}:r:some-task", mapping=record)
        worker = Worker(config, redis_url, SECRET, queues=["default"], concurrency=1)
        worker.connect()
        try:
            worker._housekeeping(beat=True, beats=9)  # every step, the lease sweep too
            assert worker._failing == {}, worker._failing
            worker._heartbeat()
            assert worker.worker_id in worker.store.workers()
        finally:
            worker.transport.close()


@examples
@given(entries=st.lists(st.dictionaries(st.sampled_from([b"e", b"x", b"n"]), junk), max_size=5))
def test_listener_delivers_real_events_among_junk(
    r: redis.Redis, redis_url: str, entries: list[dict[bytes, bytes]]
) -> None:
    with fresh_prefix(r, redis_url) as config:
        transport = open_broker(config, redis_url)
        channel = transport.store.channel_key(uuid.uuid4().hex[:16])
        for fields in entries:
            if fields:
                r.xadd(channel, fields)
        signer = Signer(SECRET)
        listener = Listener(transport, signer, channel, config.key_prefix)
        handle = TaskHandle(None, "real-task", "t")
        listener.register(handle)
        try:
            data = {"serializer": "cloudpickle"}
            event = Event(EventType.SUCCESS, "real-task", 5, data, run=(config.key_prefix, None))
            r.xadd(channel, {"e": signer.seal(event.to_header())})
            wait_until(handle.done, 10, "the real event among the junk")
            assert handle.result(0) is None
            assert listener.alive
        finally:
            listener.close()
            transport.close()


@examples
@given(
    registry=st.dictionaries(junk, junk, min_size=1, max_size=4),
    record=st.dictionaries(
        st.sampled_from([b"state", b"name", b"worker", b"pid", b"started_at"]), junk, min_size=1
    ),
)
def test_cli_status_and_inspect_survive_junk(
    r: redis.Redis,
    redis_url: str,
    registry: dict[bytes, bytes],
    record: dict[bytes, bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with fresh_prefix(r, redis_url) as config:
        p = config.key_prefix
        r.hset(f"{p}:workers", mapping=registry)
        for raw_id in registry:
            with contextlib.suppress(UnicodeDecodeError):
                r.set(f"{p}:hb:{raw_id.decode()}", b"1")  # alive: status reads them
        r.hset(f"{p}:r:looked-at", mapping=record)
        secret = tmp_path_factory.mktemp("cli") / "secret"
        secret.write_text(SECRET)
        common = ["-b", redis_url, "--key-prefix", p, "--secret-file", str(secret)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["status", *common]) == 0
            assert main(["inspect", "looked-at", *common]) in (0, 1)
        assert all(ch.isprintable() or ch in "\n\t" for ch in out.getvalue())
