"""Forged, tampered, truncated and oversized events and stored results, read by a client,
and a remote broker without a secret (DESIGN §4, §9).

Every forgery reaches a real client listener or a client re-attaching to a stored result
through the real broker, once on Redis and once on RabbitMQ (``brokers`` marker), written
to its channels and records directly as anyone with broker access can. The payloads carry
a *trace*: an object whose unpickling creates a file, so "nothing was unpickled" is checked
directly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from forging import ADD_TASK, MAC_SIZE, MARKER_TASK, flip, header_span, pickled, resign
from helpers import SECRET, Touch, task_header, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

import nbtask
from nbtask import App, Settings
from nbtask.wire.envelope import FORMAT_VERSION, Signer
from nbtask.wire.events import Event, EventType

pytestmark = pytest.mark.brokers


# Events on the client's channel -------------------------------------------------------------
def _event(task_id: str, kind: EventType = EventType.SUCCESS, seq: int = 99) -> dict[str, Any]:
    return Event(kind, task_id, seq, {"runtime": 0.0}).to_header()


def test_client_ignores_forged_events(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask.client.listener")
    trace = tmp_path / "trace-unpickled"
    marker = tmp_path / "marker"
    handle = app.send_task(MARKER_TASK, (str(marker), 0.0))  # pending: no worker yet
    tid = handle.id
    signer = app.signer
    trace_body = pickled(Touch(trace))
    valid_success = signer.seal(_event(tid), trace_body)
    start, end = header_span(valid_success)
    forged = {
        "unsigned-pickle": trace_body,
        "wrong-key-success": Signer("not-the-secret").seal(_event(tid), trace_body),
        "tampered-body": flip(valid_success, len(valid_success) - MAC_SIZE - 3),
        "tampered-header": flip(valid_success, start + (end - start) // 2),
        "tampered-mac": flip(valid_success, len(valid_success) - 1),
        "truncated": valid_success[:-5],
        "wrong-version": resign(
            valid_success[:3] + bytes((FORMAT_VERSION + 1,)) + valid_success[4:-MAC_SIZE]
        ),
        "wrong-key-failure": Signer("x").seal(
            Event(EventType.FAILURE, tid, 99, {"ename": "Forged", "evalue": "x"}).to_header()
        ),
        "signed-task-message": signer.seal(task_header(app, tid, MARKER_TASK), trace_body),
    }
    for raw in forged.values():
        access.push_event(app.channel, raw)
    # A genuine progress event after them: once it is applied, all the forgeries before
    # it on the channel have been read (the listener reads in order).
    run = (app.settings.key_prefix, handle.sent)
    progress = Event(EventType.PROGRESS, tid, 0, {"done": 1, "total": 2}, run=run)
    access.push_event(app.channel, signer.seal(progress.to_header()))
    wait_until(lambda: handle.progress is not None, 15, "the genuine progress event")
    assert handle.state is nbtask.State.PENDING
    assert not handle.done()
    assert not trace.exists(), "a forged event was unpickled"
    dropped = [r for r in caplog.records if "does not verify" in r.getMessage()]
    assert len(dropped) == len(forged), [r.getMessage() for r in caplog.records]

    worker = start_worker(concurrency=1)
    assert handle.get(timeout=15) in {c.pid for c in worker.children()}
    assert marker.read_text().count("\n") == 1
    assert not trace.exists()
    assert handle.state is nbtask.State.SUCCESS


@pytest.fixture
def finished(
    app: App, settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> tuple[str, str]:
    """Two finished add tasks: ``(id of 2+3, id of 40+2)``."""
    start_worker(concurrency=1)
    first = app.send_task(ADD_TASK, (2, 3))
    second = app.send_task(ADD_TASK, (40, 2))
    assert first.get(timeout=15) == 5
    assert second.get(timeout=15) == 42
    return first.id, second.id


@pytest.fixture
def reader(settings: Settings) -> Iterator[App]:
    """A second client (another kernel) that re-attaches to tasks by id."""
    other = App("reader", settings=settings)
    yield other
    other.close()


def test_reattach_to_stored_result_works(finished: tuple[str, str], reader: App) -> None:
    """Control for the tampering tests below."""
    assert reader.handle(finished[0]).get(timeout=5) == 5


def _tamper_result(access: RawBroker, task_id: str, raw: bytes) -> None:
    key = access.keys.record_key(task_id)
    assert access.store.hexists(key, "result")
    access.store.hset(key, "result", raw)


def _stored(access: RawBroker, task_id: str) -> bytes:
    return access.record(task_id)[b"result"]


@pytest.mark.parametrize("how", ["body", "header", "mac", "truncate"])
def test_tampered_stored_result_raises_signature_error(
    how: str, finished: tuple[str, str], reader: App, access: RawBroker
) -> None:
    tid = finished[0]
    raw = _stored(access, tid)
    start, end = header_span(raw)
    tampered = {
        "body": flip(raw, len(raw) - MAC_SIZE - 2),
        "header": flip(raw, start + (end - start) // 2),
        "mac": flip(raw, len(raw) - 1),
        "truncate": raw[:-1],
    }[how]
    _tamper_result(access, tid, tampered)
    with pytest.raises(nbtask.SignatureError):
        reader.handle(tid)


@pytest.mark.parametrize("how", ["unsigned-pickle", "wrong-key"])
def test_forged_stored_result_is_never_unpickled(
    how: str, finished: tuple[str, str], reader: App, access: RawBroker, tmp_path: Path
) -> None:
    tid = finished[0]
    trace = tmp_path / "trace-unpickled"
    body = pickled(Touch(trace))
    forged = body if how == "unsigned-pickle" else Signer("x").seal(_event(tid), body)
    _tamper_result(access, tid, forged)
    with pytest.raises(nbtask.NbtaskError):
        reader.handle(tid)
    assert not trace.exists()


def test_stored_result_of_another_task_is_refused(
    finished: tuple[str, str], reader: App, access: RawBroker
) -> None:
    """A genuinely signed result copied from task B's record into task A's must not pass
    for A's result: the signed header names the task it belongs to."""
    first, second = finished
    _tamper_result(access, first, _stored(access, second))
    with pytest.raises(nbtask.NbtaskError):
        value = reader.handle(first).get(timeout=5)
        pytest.fail(f"task {first} (2+3) reported task {second}'s result {value!r}")


# Secrets and brokers ---------------------------------------------------------------------
@pytest.mark.parametrize("url", ["redis://10.0.0.1:6379/0", "amqp://guest:guest@10.0.0.1:5672//"])
def test_remote_broker_without_secret_is_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBTASK_SECRET", raising=False)
    monkeypatch.delenv("NBTASK_SECRET_FILE", raising=False)
    monkeypatch.delenv("NBTASK_INSECURE", raising=False)
    monkeypatch.setenv("NBTASK_RESULT_URL", "redis://10.0.0.1:6379/0")
    with pytest.raises(nbtask.ConfigurationError) as info:
        App(broker=url)
    assert "NBTASK_SECRET" in str(info.value)
    assert "insecure" in str(info.value)


def test_insecure_app_sends_and_warns(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NBTASK_SECRET", raising=False)
    monkeypatch.delenv("NBTASK_SECRET_FILE", raising=False)
    insecure = App(broker=redis_url, insecure=True, key_prefix=prefix)
    try:
        with pytest.warns(UserWarning, match="insecure"):
            handle = insecure.send_task(ADD_TASK, (1, 2))
        client = redis.Redis.from_url(redis_url)
        try:
            [(_, fields)] = client.xrange(f"{prefix}:q:default")
        finally:
            client.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            envelope = Signer(None, insecure=True).open(fields[b"e"])
        assert envelope.header["id"] == handle.id
        # A worker with a real secret would refuse it.
        with pytest.raises(nbtask.SignatureError):
            Signer(SECRET).open(fields[b"e"])
    finally:
        insecure.close()
