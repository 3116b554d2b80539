"""The worker's log line for a task that failed: at ERROR with the traceback from the
task's code, or, for an exception the task expects (Celery's ``throws``), one line at INFO
without a traceback."""

from __future__ import annotations

import pytest
from helpers import wait_until

from nbtask import App

pytestmark = pytest.mark.brokers


def test_an_expected_exception_is_logged_at_info_without_its_traceback(
    app: App, start_worker
) -> None:
    worker = start_worker()

    @app.task(throws=(KeyError,))
    def lookup(key: str) -> None:
        raise {"missing": KeyError, "broken": ValueError}[key](f"no {key} here")

    expected, unexpected = lookup.delay("missing"), lookup.delay("broken")
    # Both are failures for the client, with their tracebacks, as in Celery.
    with pytest.raises(KeyError, match="no missing here"):
        expected.get(timeout=15)
    with pytest.raises(ValueError, match="no broken here"):
        unexpected.get(timeout=15)
    assert expected.status == unexpected.status == "FAILURE"
    assert expected.traceback and "no missing here" in expected.traceback

    def lines(task_id: str) -> list[str]:
        return [line for line in worker.log.read_text().splitlines() if task_id in line]

    wait_until(lambda: lines(expected.id) and lines(unexpected.id), 10, "the log lines")
    (said,) = lines(expected.id)
    assert " INFO " in said and "raised KeyError: " in said and "expected" in said, said
    (error,) = lines(unexpected.id)
    assert " ERROR " in error and "raised ValueError: " in error, error
    log = worker.log.read_text()
    # One traceback in the whole log: the unexpected failure's, right after its line.
    assert log.count("Traceback") == 1, log
    assert log[log.index(error) :].startswith(f"{error}\nTraceback"), log
