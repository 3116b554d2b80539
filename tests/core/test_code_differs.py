"""A worker whose copy of a task sent by name differs from its sender's says so.

The module was edited (or ``%autoreload``-ed) in the notebook since the worker imported
it: the worker still runs its own copy, as Celery's does, and the client warns once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import ROOT, wait_until

from nbtask import App, CodeDiffersWarning
from nbtask.core.fingerprint import code_differs, code_fingerprint
from nbtask.core.task import Task
from tests import sample_tasks

pytestmark = pytest.mark.brokers


@pytest.fixture
def add_sent_by(app: App) -> Iterator[Task]:
    """``tests.sample_tasks.add`` sent through the test's app (by name: the worker imports it)."""
    task = sample_tasks.add
    function = type(task).__wrapped__  # type: ignore[attr-defined]
    before, code = task.app, function.__code__
    app.register_task(task)
    yield task
    task.app = before
    function.__code__ = code


def _code_differs_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CodeDiffersWarning)]


def test_a_worker_running_other_code_than_its_sender_says_so_once(
    add_sent_by: Task, start_worker: Callable[..., Any]
) -> None:
    worker = start_worker(concurrency=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert add_sent_by.delay(2, 3).get(timeout=30) == 5
        assert _code_differs_warnings(caught) == [], "the same code was warned of"

        # What %autoreload does to a function whose module was edited.
        type(add_sent_by).__wrapped__.__code__ = (lambda x, y: x - y).__code__  # type: ignore[attr-defined]
        assert add_sent_by.delay(2, 3).get(timeout=30) == 5  # the worker's own copy ran
        assert add_sent_by.delay(4, 3).get(timeout=30) == 7
        told = _code_differs_warnings(caught)
    assert len(told) == 1, told
    assert "tests.sample_tasks.add" in told[0] and "Restart the workers" in told[0]
    wait_until(lambda: "this worker's code differs" in worker.log.read_text(), 10, "the log line")
    assert worker.log.read_text().count("this worker's code differs") == 1


def _fingerprint_in_a_new_process(source: str, seed: str) -> str:
    program = textwrap.dedent(
        """
        import sys
        from nbtask import App
        from nbtask.core.fingerprint import code_fingerprint
        app = App("probe", broker="redis://127.0.0.1:1", insecure=True)
        namespace = {"app": app}
        exec(compile(sys.argv[1], "probe.py", "exec"), namespace)
        print(code_fingerprint(namespace["probe"]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", program, source],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return out.stdout.strip()


PROBE = """
@app.task
def probe(word):
    return word in {"alpha", "beta", "gamma", "delta"} and len(word) > 2
"""


def test_a_fingerprint_is_the_same_in_every_process_and_wherever_the_function_sits() -> None:
    """Set constants iterate by hash seed, line numbers move: neither changes it."""
    first = _fingerprint_in_a_new_process(PROBE, "1")
    assert first.startswith(f"py{sys.version_info[0]}.{sys.version_info[1]}:")
    assert _fingerprint_in_a_new_process(PROBE, "2") == first
    assert _fingerprint_in_a_new_process("\n\n# moved down\n" + PROBE, "3") == first
    edited = PROBE.replace("len(word) > 2", "len(word) > 3")
    assert _fingerprint_in_a_new_process(edited, "1") != first


def test_only_a_fingerprint_of_the_same_python_is_compared() -> None:
    task = sample_tasks.add
    mine = code_fingerprint(task)
    assert mine is not None and not code_differs(mine, task)
    assert code_differs(mine[:-1] + "0" if mine[-1] != "0" else mine[:-1] + "1", task)
    assert not code_differs("py2.7:" + mine.partition(":")[2][::-1], task)
    assert not code_differs(None, task)
