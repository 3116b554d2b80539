"""A task's end always reaches its client, and stays re-attachable: after a redelivery,
when reporting the failure itself fails, when the result cannot be loaded by the client,
and when an id or a secret is wrong. Both brokers."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import remote_of, wait_until
from raw_broker import RawBroker

import nbtask
from nbtask import App, ConfigurationError, Settings, State

pytestmark = pytest.mark.brokers

ADD = "tests.sample_tasks.add"
WAIT_FOR_FILE = "tests.sample_tasks.wait_for_file"


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_redelivered_acks_late_task_after_much_output_still_succeeds(
    app: App, settings: Settings, start_worker, tmp_path: Path, access: RawBroker
) -> None:
    """Its first run printed 40 lines and was killed: the rerun's SUCCESS must not be
    taken for an event older than those lines, by this handle or a re-attached one."""
    worker = start_worker(concurrency=1)
    marker = tmp_path / "marker"

    @app.task(acks_late=True)
    def chatty_once(path: str) -> str:
        import os
        import time

        first = not os.path.exists(path)
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if first:
            for i in range(40):
                print(f"line {i}", flush=True)
            time.sleep(60)
        return "done"

    h = chatty_once.delay(str(marker))
    wait_until(lambda: h.stdout.count("\n") == 40, 15, "the first run's 40 lines")
    os.kill(pids_in(marker)[0], signal.SIGKILL)
    assert h.get(timeout=20) == "done"
    assert h.state is State.SUCCESS
    assert len(pids_in(marker)) == 2
    assert worker.process.poll() is None

    other = App("other", settings=settings)
    try:
        again = other.handle(h.id)
        assert again.get(timeout=10) == "done"  # the stored SUCCESS, after the old lines
        assert again.stdout.count("line ") == 40
    finally:
        other.close()
    assert access.stored_event_types(app.signer, app.channel, h.id).count("success") == 1


def test_exception_whose_str_raises_still_ends_the_task(app: App, start_worker) -> None:
    start_worker()

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text for this one")

    @app.task
    def fails_oddly() -> None:
        raise Unprintable()

    h = fails_oddly.delay()
    with pytest.raises(Unprintable) as info:
        h.get(timeout=10)
    assert "str() raised RuntimeError" in remote_of(info.value).evalue
    assert h.state is State.FAILURE
    assert app.send_task("tests.sample_tasks.add", (1, 1)).get(timeout=10) == 2


def test_an_exception_whose_init_takes_other_arguments_comes_back_as_its_own_type(
    app: App, start_worker
) -> None:
    start_worker()

    class QuotaExceeded(Exception):
        def __init__(self, user: str, limit: int) -> None:
            super().__init__(f"{user} is over {limit} GB")
            self.user, self.limit = user, limit

    class HoldsALock(Exception):
        def __init__(self, message: str) -> None:
            import threading

            super().__init__(message)
            self.lock, self.path = threading.Lock(), "/data/x"

    @app.task
    def over_quota() -> None:
        raise QuotaExceeded("ada", 5)

    @app.task
    def locked() -> None:
        raise HoldsALock("the file is locked")

    with pytest.raises(QuotaExceeded, match="ada is over 5 GB") as info:
        over_quota.delay().get(timeout=10)
    assert (info.value.user, info.value.limit) == ("ada", 5)
    # An attribute that cannot travel is left out; the type, message and the rest come.
    with pytest.raises(HoldsALock, match="the file is locked") as locked_info:
        locked.delay().get(timeout=10)
    assert locked_info.value.path == "/data/x"
    assert not hasattr(locked_info.value, "lock")


def test_result_only_the_worker_can_load_ends_with_a_clear_error(app: App, start_worker) -> None:
    start_worker()

    @app.task
    def returns_a_stranger() -> object:
        import sys
        import types

        module = types.ModuleType("only_on_the_worker")
        exec("class Stranger:\n    pass\n", module.__dict__)
        sys.modules["only_on_the_worker"] = module  # pickled by reference, as installed code
        return module.Stranger()

    h = returns_a_stranger.delay()
    with pytest.raises(nbtask.SerializationError, match="only_on_the_worker") as info:
        h.get(timeout=10)
    assert "install what defines it here" in str(info.value)
    assert h.state is State.SUCCESS  # it did succeed; only this process cannot load it


def test_result_whose_class_is_here_but_does_not_rebuild_says_what_failed(
    app: App, start_worker
) -> None:
    start_worker()

    class Picky:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Picky, (), {"version": 2})

        def __setstate__(self, state: dict[str, Any]) -> None:
            raise ValueError(f"version {state['version']} is not known here")

    @app.task
    def returns_picky() -> object:
        return Picky()

    h = returns_picky.delay()
    with pytest.raises(nbtask.SerializationError) as info:
        h.get(timeout=10)
    said = str(info.value)
    assert "ValueError: version 2 is not known here" in said
    assert "rebuilding the value from its state failed" in said
    assert "install" not in said  # what defines it is here: installing it changes nothing
    assert h.state is State.SUCCESS


def test_reused_task_id_is_refused_at_send_time(app: App, start_worker) -> None:
    start_worker()
    first = app.send_task("tests.sample_tasks.add", (1, 2), task_id="used-once")
    assert first.get(timeout=10) == 3
    with pytest.raises(ConfigurationError, match=r"used-once.*SUCCESS"):
        app.send_task("tests.sample_tasks.add", (3, 4), task_id="used-once")


def test_reusing_the_id_of_a_queued_or_running_task_is_refused_and_its_handle_resolves(
    app: App, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task(WAIT_FOR_FILE, (str(marker), str(go)), task_id="in-use")
    wait_until(lambda: running.state is State.STARTED, 10, "the first task to start")
    with pytest.raises(ConfigurationError, match=r"'in-use'.*not ended.*STARTED"):
        app.send_task(ADD, (1, 1), task_id="in-use")
    queued = app.send_task(ADD, (2, 2), task_id="queued")  # behind it, on the one child
    with pytest.raises(ConfigurationError, match=r"'queued'.*not ended.*PENDING"):
        app.send_task(ADD, (3, 3), task_id="queued")
    go.touch()
    assert running.get(timeout=10) == pids_in(marker)[0]  # the first handle still resolves
    assert queued.get(timeout=10) == 4
    assert len(pids_in(marker)) == 1  # nothing was sent for the second call


def test_client_with_another_secret_is_refused_at_send_time(
    settings: Settings, start_worker
) -> None:
    start_worker()
    stranger = App("stranger", settings=settings.replace(secret="not-the-workers-secret"))
    try:
        with pytest.raises(ConfigurationError, match=r"queue 'default'.*NBTASK_SECRET"):
            stranger.send_task("tests.sample_tasks.add", (1, 1))
    finally:
        stranger.close()


def test_two_apps_with_different_secrets_on_one_prefix_are_refused(
    app: App, start_worker, tmp_path: Path
) -> None:
    """Each app's workers would dead-letter the other's tasks: half of them lost."""
    start_worker()
    other_secret = tmp_path / "secret"
    other_secret.write_text("the-other-apps-secret")
    start_worker("--secret-file", str(other_secret))
    with pytest.raises(ConfigurationError, match="also served by workers"):
        app.send_task("tests.sample_tasks.add", (1, 1))
