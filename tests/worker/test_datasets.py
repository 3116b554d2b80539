"""Named datasets: loaded once per worker process, routed to, passed to the tasks needing them.

Both brokers. One worker holds ``squares`` (``--data squares=tests.sample_tasks:load_squares``),
another holds nothing.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import client_env, wait_until

from nbtask import App, ConfigurationError
from nbtask.core.datasets import DatasetMissing

pytestmark = pytest.mark.brokers

SQUARES = "squares=tests.sample_tasks:load_squares"


def test_tasks_requiring_a_dataset_run_where_it_is_and_receive_it(
    app: App, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = tmp_path / "loads"
    monkeypatch.setenv("NBTASK_TEST_LOADS", str(loads))
    holder = start_worker("--data", SQUARES, concurrency=1)
    start_worker(concurrency=1)  # holds nothing

    @app.task(requires="squares")
    def total(offset: int, squares: list[int]) -> int:
        return offset + sum(squares)

    handles = [total.delay(i) for i in range(6)]
    assert [h.get(timeout=20) for h in handles] == [285 + i for i in range(6)]
    assert {h.info["pid"] for h in handles} <= {c.pid for c in holder.children()}
    assert len(loads.read_text().split()) == 1, "loaded more than once in one process"
    assert sorted(info.datasets for info in app.workers().values()) == [(), ("squares",)]
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbtask",
            "status",
            "-b",
            app.settings.broker_url or "",
            "--key-prefix",
            app.settings.key_prefix,
        ],
        capture_output=True,
        text=True,
        env=client_env(app.settings),
        check=True,
    ).stdout
    assert status.count("datasets squares") == 1, status


def test_a_worker_without_the_dataset_fails_the_task_saying_so(app: App, start_worker) -> None:
    start_worker(concurrency=1)

    @app.task
    def total(squares: list[int]) -> int:
        return sum(squares)

    handle = total.apply_async(queue="default", requires=("squares",))
    with pytest.raises(DatasetMissing, match=r"holds no dataset 'squares' .*--data squares="):
        handle.get(timeout=20)


def test_an_app_declares_a_dataset_for_the_workers_that_import_it(app: App, start_worker) -> None:
    start_worker("-A", "tests.sample_datasets", concurrency=1)

    @app.task(requires=("greeting",))
    def shout(greeting: str) -> str:
        return greeting.upper()

    assert shout.delay().get(timeout=20) == "HELLO FROM A DATASET"
    wait_until(
        lambda: any("greeting" in i.datasets for i in app.workers().values()), 5, "the registry"
    )


@pytest.mark.parametrize("bad", ["not a name", ["ok", 3], 7])
def test_requires_takes_dataset_names(app: App, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="dataset names that are Python identifiers"):
        app.task(requires=bad)(lambda: None)


def test_an_errbacks_request_leaves_out_the_dataset_and_a_retry_gets_it_again(
    app: App, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dataset stays on its workers: not in the request an errback is sent
    # (error_handler(request, exc, traceback)), nor in a retry's new arguments.
    monkeypatch.setenv("NBTASK_TEST_LOADS", str(tmp_path / "loads"))
    start_worker("--data", SQUARES, concurrency=1)

    @app.task(bind=True, requires="squares", max_retries=1)
    def total(self: Any, offset: int, squares: list[int]) -> int:
        if self.request.retries == 0:
            raise self.retry(args=(offset + 1,), countdown=0)
        raise ValueError(offset + sum(squares))

    @app.task
    def error_handler(request: Any, exc: BaseException, traceback: str) -> tuple:
        return sorted(request.kwargs), request.args, str(exc)

    errback_id = uuid.uuid4().hex
    errback = app.expect(errback_id, error_handler.name)
    h = total.apply_async((1,), link_error=error_handler.s().set(task_id=errback_id))
    with pytest.raises(ValueError, match="287"):
        h.get(timeout=20)
    assert errback.get(timeout=20) == ([], (2,), "287")
