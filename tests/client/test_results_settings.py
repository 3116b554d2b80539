"""Results and app-wide settings: ignore_result, task_ignore_result, backend=None, the json
serializer, expires, update_state."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
import redis
from helpers import wait_until

import nbtask
from nbtask import App, Event, EventType, Settings, State, Task
from nbtask.errors import BlobError
from nbtask.wire.records import TaskRecord

pytestmark = pytest.mark.brokers


def _second_client(settings: Settings) -> App:
    """Another process's view: a fresh client on the same broker and prefix."""
    return App("second", settings=settings)


# ignore_result ---------------------------------------------------------------------------------
def test_ignore_result_client_still_learns_success_store_keeps_no_result(
    app: App, start_worker
) -> None:
    start_worker()

    @app.task(ignore_result=True)
    def fire_and_forget(x: int) -> int:
        return x + 1

    @app.task(ignore_result=True, store_errors_even_if_ignored=True)  # Celery's spelling
    def fails_anyway() -> None:
        raise ValueError("still reported")

    h = fire_and_forget.delay(1)
    assert h.get(timeout=10) == 2  # the caller's own handle is told
    assert h.state is State.SUCCESS
    record = app.store.get_record(h.id)
    assert record.state == "SUCCESS"
    assert _no_value_kept(app, record)

    # Failures are still stored: ignore_result is about return values (as Celery's
    # store_errors_even_if_ignored=True; nbtask stores them without it too).
    bad = fails_anyway.delay()
    with pytest.raises(ValueError, match="still reported"):
        bad.get(timeout=10)
    assert app.store.get_record(bad.id).result is not None


@pytest.mark.parametrize("who", ["same client", "another client"])
def test_reattach_to_a_finished_ignore_result_task(
    app: App, start_worker, settings: Settings, who: str
) -> None:
    # The store knows the task succeeded but keeps no value: a re-attached handle must
    # say SUCCESS, not PENDING forever, and its get() must say the value was not kept,
    # never return None in its place (before, it returned None).
    start_worker()

    @app.task(ignore_result=True)
    def fire_and_forget(x: int) -> int:
        return x + 1

    h = fire_and_forget.delay(1)
    assert h.get(timeout=10) == 2
    client = app if who == "same client" else _second_client(settings)
    try:
        again = client.handle(h.id)
        wait_until(again.ready, 5, f"the handle re-attached by the {who} to settle")
        assert again.state is State.SUCCESS
        with pytest.raises(BlobError, match=r"succeeded, but its result was not kept"):
            again.get(timeout=5)
    finally:
        if client is not app:
            client.close()


def test_app_wide_task_ignore_result(settings: Settings, start_worker) -> None:
    start_worker()
    quiet = App("quiet", settings=settings.replace(task_ignore_result=True))
    try:

        @quiet.task
        def default(x: int) -> int:
            return x * 2

        @quiet.task(ignore_result=False)
        def keeps(x: int) -> int:
            return x * 3

        h1, h2 = default.delay(2), keeps.delay(2)
        assert (h1.get(timeout=10), h2.get(timeout=10)) == (4, 6)
        assert _no_value_kept(quiet, quiet.store.get_record(h1.id))
        assert quiet.store.get_record(h2.id).result is not None
    finally:
        quiet.close()


def test_task_ignore_result_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBTASK_TASK_IGNORE_RESULT", "1")
    assert Settings.from_env().task_ignore_result is True
    monkeypatch.setenv("NBTASK_TASK_IGNORE_RESULT", "0")
    assert Settings.from_env().task_ignore_result is False


def test_backend_none_keeps_no_result_only_that_the_task_ended(app: App, start_worker) -> None:
    start_worker()

    @app.task(backend=None)
    def unrecorded(x: int) -> int:
        return -x

    @app.task(backend=None)
    def unrecorded_failure() -> None:
        raise KeyError("told, not stored")

    h = unrecorded.delay(5)
    assert h.get(timeout=10) == -5
    assert h.state is State.SUCCESS
    record = app.store.get_record(h.id)
    assert record is not None and record.state is State.SUCCESS
    assert _no_value_kept(app, record)
    with pytest.raises(BlobError, match="not kept"):  # re-attached: it ended, no value kept
        app.handle(h.id).get(timeout=5)

    bad = unrecorded_failure.delay()
    with pytest.raises(KeyError, match="told, not stored"):
        bad.get(timeout=10)
    stored = app.store.get_record(bad.id)
    assert stored is not None and stored.state is State.FAILURE and stored.result is not None
    assert b"told, not stored" not in stored.result  # no message, no traceback kept


# Serializers -----------------------------------------------------------------------------------
def test_json_serializer_round_trip(app: App, start_worker) -> None:
    start_worker()

    @app.task(serializer="json")
    def echo(value: object, *, label: str = "") -> dict:
        return {"value": value, "label": label, "type": type(value).__name__}

    data = {"a": [1, 2.5, None, True], "b": {"nested": "ü"}}
    assert echo.delay(data, label="x").get(timeout=10) == {
        "value": data,
        "label": "x",
        "type": "dict",
    }
    # JSON has no tuples: they arrive as lists, as with Celery's json serializer.
    assert echo.delay((1, 2)).get(timeout=10)["value"] == [1, 2]


def test_json_serializer_refuses_non_json_arguments_at_the_call_site(
    app: App, prefix: str, r: redis.Redis
) -> None:
    @app.task(serializer="json")
    def plain(x: object, when: object = None) -> None:
        return None

    with pytest.raises(nbtask.SerializationError) as info:
        plain.delay(1, when=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))
    assert "'when'" in str(info.value)
    assert "json" in str(info.value)

    with pytest.raises(nbtask.SerializationError) as info2:
        plain.delay({1, 2})
    assert "argument 0" in str(info2.value)

    with pytest.raises(nbtask.SerializationError):
        plain.delay(threading.Lock())
    # Nothing reached the broker.
    assert r.xlen(f"{prefix}:q:default") == 0
    assert list(r.scan_iter(match=f"{prefix}:r:*")) == []


def test_json_task_returning_a_non_json_value_fails_clearly(app: App, start_worker) -> None:
    start_worker()

    @app.task(serializer="json")
    def returns_a_set() -> set:
        return {1, 2}

    with pytest.raises(nbtask.SerializationError, match="json"):
        returns_a_set.delay().get(timeout=10)


# expires ---------------------------------------------------------------------------------------
def test_expires_drops_stale_messages_as_revoked(
    app: App, start_worker, tmp_path: Path, prefix: str, r: redis.Redis
) -> None:
    ledger = tmp_path / "ledger"

    @app.task(expires=0.3)
    def stale_by_default(path: str) -> None:
        with open(path, "a") as f:
            f.write("default\n")

    @app.task
    def stale_per_call(path: str) -> None:
        with open(path, "a") as f:
            f.write("per call\n")

    @app.task
    def fresh() -> str:
        return "fresh"

    h1 = stale_by_default.delay(str(ledger))
    h2 = stale_per_call.apply_async((str(ledger),), expires=0.3)
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.3)
    h3 = stale_per_call.apply_async((str(ledger),), expires=soon)
    h4 = fresh.apply_async(expires=60)
    stale_at = time.time() + 0.3
    wait_until(lambda: time.time() > stale_at, 5, "the tasks to be stale (nobody serves them)")
    start_worker()
    for h in (h1, h2, h3):
        with pytest.raises(nbtask.TaskRevoked):
            h.get(timeout=10)
        assert h.state is State.REVOKED
        assert h.info.get("reason") == "expired"
        assert app.store.get_record(h.id).state == "REVOKED"
    assert h4.get(timeout=10) == "fresh"
    assert not ledger.exists(), "an expired task ran"


# update_state ----------------------------------------------------------------------------------
def test_update_state_custom_state_on_the_handle(app: App, start_worker, tmp_path: Path) -> None:
    start_worker()
    go = tmp_path / "go"

    @app.task(bind=True)
    def stepwise(self: Task, go: str) -> str:
        import time as t
        from pathlib import Path as P

        self.update_state(state="PROGRESS", meta={"step": 1, "of": 2})
        deadline = t.monotonic() + 15
        while not P(go).exists() and t.monotonic() < deadline:
            t.sleep(0.02)
        self.update_state(state="SAVING", meta={"step": 2, "of": 2})
        t.sleep(0.3)
        return "done"

    seen: list[object] = []

    def record(event: Event) -> None:
        if event.type is EventType.STATE:
            seen.append(event.data["state"])

    # Attached at send time: the first update_state can arrive before delay() returns.
    h = stepwise.apply_async((str(go),), on_event=record)
    try:
        wait_until(lambda: h.state == "PROGRESS", 10, "the custom state")
        assert h.info["meta"] == {"step": 1, "of": 2}
        assert not h.done()
    finally:
        go.touch()
    wait_until(lambda: h.state == "SAVING", 10, "the second custom state")
    assert h.info["meta"] == {"step": 2, "of": 2}
    assert h.get(timeout=10) == "done"
    assert h.state is State.SUCCESS
    assert "PROGRESS" in seen and "SAVING" in seen


def test_update_state_outside_a_task_is_refused() -> None:
    local = App("local", settings=Settings(insecure=True))

    @local.task(bind=True)
    def bound(self: Task) -> None:
        self.update_state(state="X")

    with pytest.raises(RuntimeError, match="only available while the task runs"):
        bound()
    local.close()


def _no_value_kept(app: App, record: TaskRecord | None) -> bool:
    """The store holds the signed outcome of an ignore_result task, without its value."""
    assert record is not None and record.result is not None
    envelope = app.signer.open(record.result)
    return envelope.body == b"" and envelope.header["data"].get("result_kept") is False
