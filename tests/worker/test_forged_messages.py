"""Forged, tampered, truncated, oversized, replayed and expired task messages fed to a
worker (DESIGN §4, §9).

Every attack is fed to a real worker (``start_worker``) through the real broker, once on
Redis and once on RabbitMQ (``brokers`` marker), by writing to its queues directly as
anyone with broker access can. The payloads carry a
*trace*: an object whose unpickling creates a file, so "nothing was unpickled" is checked
directly, and a *marker* task that appends a line to a file, so "nothing was executed"
(and "executed once") is checked directly too.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from forging import ADD_TASK, MAC_SIZE, MARKER_TASK, flip, header_span, pickled, resign
from helpers import Touch, task_header, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

import nbtask
from nbtask import App
from nbtask.brokers.redis_store import DEAD_LETTER_BYTES
from nbtask.core.holding import holder_queue
from nbtask.wire.envelope import FORMAT_VERSION, MAGIC, Signer
from nbtask.wire.events import Event, EventType

SMALL_LIMIT = 64 * 1024  # NBTASK_MAX_MESSAGE_BYTES of the workers in this module

pytestmark = pytest.mark.brokers


# Payloads whose unpickling leaves a trace --------------------------------------------------
class _FalseAfterTouch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (bool, (Touch(self.path),))


class ZeroSeconds:
    """Unpickles to ``0.0`` after creating ``path``: a valid ``seconds`` for slow_marker."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (float, (_FalseAfterTouch(self.path),))


class Attack:
    """Files the attack checks, and the app that knows the real secret."""

    def __init__(self, app: App, tmp_path: Path) -> None:
        self.app = app
        self.trace = tmp_path / "trace-unpickled"
        self.marker = tmp_path / "marker-executed"
        self.task_id = uuid.uuid4().hex

    def body(self) -> bytes:
        """Arguments of the marker task; unpickling them creates the trace file."""
        return pickled(((str(self.marker), ZeroSeconds(self.trace)), {}))

    def valid(self, **changes: Any) -> bytes:
        return self.app.signer.seal(
            task_header(self.app, self.task_id, MARKER_TASK, **changes), self.body()
        )


# The forged task messages ------------------------------------------------------------------
def _unsigned_pickle(a: Attack) -> bytes:
    return pickled(((str(a.marker), ZeroSeconds(a.trace)), {}))


def _unsigned_trace(a: Attack) -> bytes:
    return pickled(Touch(a.trace))


def _wrong_key(a: Attack) -> bytes:
    return Signer("not-the-secret").seal(task_header(a.app, a.task_id, MARKER_TASK), a.body())


def _tampered_header(a: Attack) -> bytes:
    raw = a.valid()
    start, end = header_span(raw)
    at = raw.index(b'"created"', start, end) + 12  # a digit of the timestamp
    return flip(raw, at)


def _tampered_body(a: Attack) -> bytes:
    raw = a.valid()
    _, end = header_span(raw)
    return flip(raw, end + (len(raw) - MAC_SIZE - end) // 2)


def _tampered_mac(a: Attack) -> bytes:
    raw = a.valid()
    return flip(raw, len(raw) - 1)


def _truncated_mac(a: Attack) -> bytes:
    return a.valid()[:-1]


def _truncated_half(a: Attack) -> bytes:
    raw = a.valid()
    return raw[: len(raw) // 2]


def _truncated_prefix(a: Attack) -> bytes:
    return a.valid()[:8]


def _empty(a: Attack) -> bytes:
    return b""


def _wrong_version(a: Attack) -> bytes:
    # Correctly MACed with the real secret, so only the version check can reject it.
    raw = a.valid()
    unsigned = raw[:3] + bytes((FORMAT_VERSION + 1,)) + raw[4:-MAC_SIZE]
    return resign(unsigned)


def _oversized_garbage(a: Attack) -> bytes:
    return MAGIC + bytes((FORMAT_VERSION,)) + b"\x00\x00\x00\x02{}" + b"x" * (SMALL_LIMIT * 2)


def _oversized_signed(a: Attack) -> bytes:
    # Signed with the real secret, but over the worker's NBTASK_MAX_MESSAGE_BYTES.
    return a.valid(padding="p" * (SMALL_LIMIT * 2))


def _signed_event_as_task(a: Attack) -> bytes:
    # A genuine signed event (workers write these to client channels, which anyone with
    # broker access can read) pushed into a task queue: not a task, must not run.
    event = Event(EventType.SUCCESS, a.task_id, 5)
    return a.app.signer.seal(event.to_header(), pickled(Touch(a.trace)))


def _signed_bad_field_types(a: Attack) -> bytes:
    return a.valid(created="yesterday", code_len="many")


def _signed_nan_created(a: Attack) -> bytes:
    # JSON as Python writes it takes NaN: no age, so never too old (a replay ran).
    return a.valid(created=math.nan)


def _signed_huge_created(a: Attack) -> bytes:
    return a.valid(created=10**400)  # JSON integers have no bound: no float holds it


def _signed_infinite_eta(a: Attack) -> bytes:
    return a.valid(eta=math.inf)


def _signed_absurd_eta(a: Attack) -> bytes:
    return a.valid(eta=1e300)


FORGERIES: dict[str, Callable[[Attack], bytes]] = {
    "unsigned-pickle": _unsigned_pickle,
    "unsigned-trace-object": _unsigned_trace,
    "wrong-key": _wrong_key,
    "tampered-header": _tampered_header,
    "tampered-body": _tampered_body,
    "tampered-mac": _tampered_mac,
    "truncated-mac": _truncated_mac,
    "truncated-half": _truncated_half,
    "truncated-prefix": _truncated_prefix,
    "empty": _empty,
    "wrong-version": _wrong_version,
    "oversized-garbage": _oversized_garbage,
    "oversized-signed": _oversized_signed,
    "signed-event-as-task": _signed_event_as_task,
    "signed-bad-field-types": _signed_bad_field_types,
    "signed-nan-created": _signed_nan_created,
    "signed-huge-created": _signed_huge_created,
    "signed-infinite-eta": _signed_infinite_eta,
    "signed-absurd-eta": _signed_absurd_eta,
}
# The field the log line names, for a signed message refused for one of its times.
NAMED_FIELD = {
    "signed-nan-created": "'created'",
    "signed-huge-created": "'created'",
    "signed-infinite-eta": "'eta'",
    "signed-absurd-eta": "'eta'",
}


@pytest.fixture
def small_worker(
    start_worker: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> WorkerProcess:
    """A worker (one child) whose message limit is SMALL_LIMIT."""
    # start_worker copies os.environ, so the limit reaches the worker only.
    monkeypatch.setenv("NBTASK_MAX_MESSAGE_BYTES", str(SMALL_LIMIT))
    return start_worker(concurrency=1)


def _log_lines(worker: WorkerProcess, word: str) -> list[str]:
    return [line for line in worker.log.read_text().splitlines() if word in line]


def _assert_still_serving(app: App, worker: WorkerProcess, child_pids: set[int]) -> None:
    assert worker.process.poll() is None, worker.log.read_text()
    assert {c.pid for c in worker.children()} == child_pids, (
        f"a child process died:\n{worker.log.read_text()}"
    )
    handle = app.send_task(ADD_TASK, (2, 3))
    assert handle.get(timeout=15) == 5, worker.log.read_text()


@pytest.mark.parametrize("kind", list(FORGERIES))
def test_worker_rejects_forged_message(
    kind: str, app: App, access: RawBroker, small_worker: WorkerProcess, tmp_path: Path
) -> None:
    attack = Attack(app, tmp_path)
    raw = FORGERIES[kind](attack)
    children = {c.pid for c in small_worker.children()}
    access.inject(raw)
    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the worker to dead-letter it")
    assert [fields[b"e"] for fields in access.dead_letters()] == [raw]
    assert access.record(attack.task_id) == {}

    _assert_still_serving(app, small_worker, children)
    assert access.drained()
    assert not attack.trace.exists(), "the forged message was unpickled"
    assert not attack.marker.exists(), "the forged message was executed"
    lines = _log_lines(small_worker, "rejected")
    assert len(lines) == 1, lines
    assert NAMED_FIELD.get(kind, "") in lines[0], lines
    assert "Traceback" not in small_worker.log.read_text()


@pytest.mark.parametrize("kind", ["unsigned-trace-object", "wrong-key", "tampered-header"])
def test_a_forgery_left_on_a_stopped_process_queue_is_dead_lettered_not_moved(
    kind: str, app: App, access: RawBroker, small_worker: WorkerProcess, tmp_path: Path
) -> None:
    """A stopping worker sends on what waits on its processes' own queues: forgeries excepted."""
    attack = Attack(app, tmp_path)
    raw = FORGERIES[kind](attack)
    [info] = [i for i in app.workers().values() if i.pid == small_worker.pid]
    own = holder_queue(info.consumers[0])
    access.inject(raw, task_id=attack.task_id, queue=own)
    small_worker.stop()  # before stopping, it moves what waits on its own queues
    assert [fields[b"e"] for fields in access.dead_letters()] == [raw]
    assert access.drained() and not access.queue_exists(own)
    assert access.record(attack.task_id) == {}
    assert not attack.trace.exists(), "the forged message was unpickled"
    assert len(_log_lines(small_worker, "dead-lettered an unverifiable message")) == 1


@pytest.mark.parametrize("kind", ["wrong-key", "tampered-body"])
def test_forged_message_naming_an_unknown_task_leaves_no_record(
    kind: str, app: App, access: RawBroker, small_worker: WorkerProcess, tmp_path: Path
) -> None:
    """The task id beside a message is the attacker's too: the start check may mark it
    STARTED before the signature is checked, and that record must not outlive the check."""
    attack = Attack(app, tmp_path)
    raw = FORGERIES[kind](attack)
    access.inject(raw, task_id=attack.task_id)
    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the worker to dead-letter it")
    _assert_still_serving(app, small_worker, {c.pid for c in small_worker.children()})
    assert access.record(attack.task_id) == {}
    assert not attack.trace.exists() and not attack.marker.exists()
    assert len(_log_lines(small_worker, "rejected")) == 1


def test_forged_message_naming_a_pending_task_fails_it_and_says_why(
    app: App, access: RawBroker, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """A message that does not verify, beside the id of a real queued task, is refused; the
    start check had already claimed that task, so its client is told it was not run."""
    attack = Attack(app, tmp_path)
    # The genuine message waits for its countdown; the forgery is on the queue now.
    genuine = app.send_task(ADD_TASK, (1, 2), countdown=3.0)
    access.inject(_wrong_key(attack), task_id=genuine.id)
    worker = start_worker(concurrency=1)
    with pytest.raises(nbtask.NbtaskError, match="failed verification"):
        genuine.get(timeout=15)
    assert access.record(genuine.id)[b"state"] == b"FAILURE"
    assert not attack.trace.exists() and not attack.marker.exists()
    assert len(_log_lines(worker, "rejected")) == 1
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4


def test_a_genuine_message_over_the_workers_size_limit_fails_its_task_saying_why(
    app: App, small_worker: WorkerProcess
) -> None:
    """A worker whose ``max_message_bytes`` is below its client's cannot take the message:
    the task fails saying so, not left PENDING for ever."""
    handle = app.send_task(ADD_TASK, ("x" * (2 * SMALL_LIMIT), "y"))
    with pytest.raises(nbtask.NbtaskError, match=r"failed verification.*over the limit"):
        handle.get(timeout=15)


@pytest.mark.parametrize("named", [True, False], ids=["id-named", "id-unnamed"])
def test_worker_drops_replay_of_finished_task(
    named: bool,
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    # Send before any worker runs, so the genuine signed bytes can be read back.
    handle = app.send_task(MARKER_TASK, (str(marker), 0.0))
    app.flush()  # on RabbitMQ a lone send returns before its confirm
    genuine = access.peek()
    worker = start_worker(concurrency=1)
    children = {c.pid for c in worker.children()}
    handle.get(timeout=15)
    assert marker.read_text().count("\n") == 1

    # Replayed with the task id beside it (as nbtask sends it) or without (the worker
    # finds it in the signed header): refused before or after verification.
    task_id = handle.id if named else None
    access.inject(genuine, task_id=task_id)
    access.inject(genuine, deliveries=3, task_id=task_id)
    wait_until(lambda: len(_log_lines(worker, handle.id)) == 2, 15, "both replays to be dropped")
    _assert_still_serving(app, worker, children)
    assert marker.read_text().count("\n") == 1, "a replayed task ran again"
    assert access.record(handle.id)[b"state"] == b"SUCCESS"
    assert access.drained()
    lines = _log_lines(worker, handle.id)
    assert len(lines) == 2, lines  # one clear line per replay
    assert all("already SUCCESS" in line for line in lines)


def test_worker_rejects_message_older_than_max_age(
    app: App, access: RawBroker, small_worker: WorkerProcess, tmp_path: Path
) -> None:
    (tmp_path / "old").mkdir()
    attack = Attack(app, tmp_path / "old")
    # Genuinely signed, but made just over max_age ago: unset, it is result_ttl.
    assert app.settings.max_age is None
    raw = attack.valid(created=time.time() - app.settings.result_ttl - 5)
    children = {c.pid for c in small_worker.children()}
    access.inject(raw)
    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the worker to dead-letter it")
    assert [f[b"e"] for f in access.dead_letters()] == [raw]
    _assert_still_serving(app, small_worker, children)
    assert not attack.trace.exists()
    assert not attack.marker.exists()
    lines = [line for line in small_worker.log.read_text().splitlines() if attack.task_id in line]
    assert len(lines) == 1, lines
    assert "max_age" in lines[0]
    # Control: the same, made well within max_age, runs.
    (tmp_path / "recent").mkdir()
    recent = Attack(app, tmp_path / "recent")
    access.inject(recent.valid(created=time.time() - app.settings.result_ttl + 30))
    wait_until(lambda: access.record(recent.task_id).get(b"state") == b"SUCCESS", 15, "the control")
    assert recent.marker.read_text().count("\n") == 1


def test_worker_runs_the_same_message_when_genuine(
    app: App, access: RawBroker, small_worker: WorkerProcess, tmp_path: Path
) -> None:
    """Control for the forgeries: the same hand-built message, genuinely signed, runs once."""
    attack = Attack(app, tmp_path)
    access.inject(attack.valid())
    wait_until(
        lambda: access.record(attack.task_id).get(b"state") == b"SUCCESS", 15, "the control task"
    )
    assert attack.marker.read_text().count("\n") == 1
    assert attack.trace.exists()  # the control's arguments were (legitimately) unpickled


def test_a_huge_refused_message_leaves_only_its_start_size_and_hash_in_the_store(
    app: App, access: RawBroker, small_worker: WorkerProcess
) -> None:
    """Whoever may publish to RabbitMQ, but not write to the store, cannot fill the store."""
    raw = MAGIC + bytes((FORMAT_VERSION,)) + os.urandom(DEAD_LETTER_BYTES * 3)
    access.inject(raw)
    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the worker to dead-letter it")
    [kept] = access.dead_letters()
    assert kept[b"e"] == raw[:DEAD_LETTER_BYTES]
    assert (int(kept[b"size"]), kept[b"sha256"].decode()) == (
        len(raw),
        hashlib.sha256(raw).hexdigest(),
    )
    assert app.send_task(ADD_TASK, (2, 3)).get(timeout=15) == 5
