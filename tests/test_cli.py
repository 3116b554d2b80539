"""The ``nbtask`` command, run as ``python -m nbtask`` in a subprocess."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, SECRET
from worker_process import WorkerProcess

import nbtask
from nbtask import App


def run(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nbtask ARGS`` with no NBTASK_* variable but those in ``env``.

    ``stdin`` is all the command can read (``""``: it reads end of file at once).
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    base["PYTHONPATH"] = str(ROOT)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "nbtask", *args],
        env=base,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
    )


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def on_redis(redis_url: str, prefix: str) -> Run:
    """``run(COMMAND, *ARGS)`` on the real Redis under the test's key prefix, with the
    suite's secret (or ``secret=``)."""

    def command(name: str, *args: str, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
        cli = ("-b", redis_url, "--key-prefix", prefix)
        return run(name, *args, *cli, env={"NBTASK_SECRET": secret})

    return command


def fields_of(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The ``name: value`` lines of what a command that succeeded printed."""
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# Help and version ------------------------------------------------------------------------
def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"nbtask {nbtask.__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["worker", "--help"],
        ["cluster", "--help"],
        ["status", "--help"],
        ["inspect", "--help"],
    ],
)
def test_help_exits_zero(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: nbtask")
    assert result.stderr == ""


def test_top_level_help_lists_the_commands() -> None:
    out = run("--help").stdout
    for command in ("worker", "cluster", "status", "inspect"):
        assert command in out


def test_worker_help_documents_its_options() -> None:
    out = run("worker", "--help").stdout
    for option in ("--broker", "--secret-file", "--insecure", "--concurrency", "--app", "-Q"):
        assert option in out


def test_cluster_help_says_an_apps_broker_is_not_used() -> None:
    """``cluster`` has no -b, and serves its own Redis whatever the -A App names."""
    out = " ".join(run("cluster", "--help").stdout.split())
    assert "-b and the other options win" not in out, out
    assert "an App's broker, secret and key prefix are not used" in out, out


def test_no_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "worker" in result.stdout + result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# Bad input: exit 2 and one clear line ------------------------------------------------------
def test_worker_without_broker() -> None:
    result = run("worker")
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith("nbtask worker: error:")
    assert "NBTASK_BROKER" in line
    assert "-b" in line


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "localhost:6379", "amqpx://h//"])
def test_worker_bad_url_scheme(url: str) -> None:
    result = run("worker", "-b", url, env={"NBTASK_SECRET": SECRET})
    assert result.returncode == 2
    line = one_error_line(result)
    assert "unsupported broker URL" in line
    assert "redis://" in line


def test_worker_bad_url_from_environment() -> None:
    result = run("worker", env={"NBTASK_BROKER": "http://x", "NBTASK_SECRET": SECRET})
    assert result.returncode == 2
    assert "redis://" in one_error_line(result)


def test_worker_missing_secret(redis_url: str) -> None:
    result = run("worker", "-b", redis_url)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "NBTASK_SECRET" in line
    assert "--secret-file" in line


def test_worker_missing_secret_file(redis_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    result = run("worker", "-b", redis_url, "--secret-file", str(missing))
    assert result.returncode == 2
    assert str(missing) in one_error_line(result)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_worker_bad_concurrency(redis_url: str, value: str) -> None:
    result = run("worker", "-b", redis_url, "-c", value, env={"NBTASK_SECRET": SECRET})
    assert result.returncode == 2
    # argparse prints its usage first; the error itself is one line naming the option.
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert "-c/--concurrency" in errors[0]
    assert "Traceback" not in result.stderr


def test_worker_unknown_app_module(redis_url: str, prefix: str, tmp_path: Path) -> None:
    result = run(
        "worker",
        "-b",
        redis_url,
        "--key-prefix",
        prefix,
        "-A",
        "no_such_module",
        env={"NBTASK_SECRET": SECRET},
        cwd=tmp_path,
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert "no_such_module" in line
    assert line.startswith("nbtask worker: error:")


def test_worker_unreachable_broker_is_one_line(prefix: str) -> None:
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    result = run(
        "worker",
        "-b",
        "redis://127.0.0.1:9/0",
        "--key-prefix",
        prefix,
        env={"NBTASK_SECRET": SECRET},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert "127.0.0.1:9" in errors[0]
    assert "start one with: redis-server --port 9," in result.stderr  # its own port


@pytest.mark.parametrize("command", ["status", "inspect"])
def test_status_and_inspect_need_a_broker(command: str) -> None:
    args = [command] if command == "status" else [command, "some-id"]
    result = run(*args)
    assert result.returncode == 2
    assert "NBTASK_BROKER" in one_error_line(result)


# Against the real Redis ----------------------------------------------------------------------
def test_status_lists_a_running_worker(
    on_redis: Run, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(concurrency=2)
    result = on_redis("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert f"pid {worker.pid}" in lines[0]
    assert "queues default" in lines[0]
    assert "concurrency 2" in lines[0]


def test_status_lists_what_each_process_holds(
    on_redis: Run, app: App, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker("--data", "squares=tests.sample_tasks:load_squares", concurrency=1)

    @app.task(requires="squares")
    def count(squares: list[int]) -> int:
        return len(squares)

    assert count.delay().get(timeout=30) == 10  # the dataset is loaded, and announced
    result = on_redis("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "queues default,data.squares " in lines[0]  # a process's own queue is not listed
    assert lines[1].startswith("  process 0 (pid ") and lines[1].endswith(" MB:")
    assert lines[2].startswith("    dataset squares  0.0 MB")


def test_status_with_no_workers(on_redis: Run) -> None:
    result = on_redis("status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no live workers"


def test_status_with_secret_file(
    redis_url: str, prefix: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(concurrency=1)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    result = run(
        "status", "-b", redis_url, "--key-prefix", prefix, "--secret-file", str(secret_file)
    )
    assert result.returncode == 0, result.stderr
    assert f"pid {worker.pid}" in result.stdout
    # ``--secret-file='~/...'``: quoted, so no shell expanded the ``~``.
    home = {"HOME": str(tmp_path)}
    result = run(
        "status", "-b", redis_url, "--key-prefix", prefix, "--secret-file=~/secret", env=home
    )
    assert result.returncode == 0, result.stderr
    assert f"pid {worker.pid}" in result.stdout


def test_inspect_finished_task(
    app: App, on_redis: Run, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(concurrency=1)
    handle = app.send_task("tests.sample_tasks.add", (2, 3))
    assert handle.get(timeout=15) == 5
    fields = fields_of(on_redis("inspect", handle.id))
    assert fields["state"] == "SUCCESS"
    assert fields["name"] == "tests.sample_tasks.add"
    assert int(fields["pid"]) in {c.pid for c in worker.children()}
    # ISO times in UTC (the worker's clock), as h.date_done gives, not epoch seconds.
    started, finished = (
        dt.datetime.fromisoformat(fields[k]) for k in ("started_at", "finished_at")
    )
    assert started.utcoffset() == dt.timedelta(0) and finished >= started, fields
    # The same time as the handle's (the ending event's), printed to the millisecond.
    done = handle.date_done
    assert done is not None and abs(done - finished) < dt.timedelta(milliseconds=1), fields


def test_inspect_failed_task_shows_its_error(
    app: App, on_redis: Run, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    failed = app.send_task("tests.sample_tasks.explode", ("boom\nsecond line",))
    with pytest.raises(ValueError):
        failed.get(timeout=15)
    fields = fields_of(on_redis("inspect", failed.id))
    assert fields["state"] == "FAILURE"
    assert fields["error"] == "ValueError: boom ..."  # its first line
    other = on_redis("inspect", failed.id, secret="another-secret")
    assert "error: (the stored outcome cannot be read: " in other.stdout


def test_inspect_pending_task(app: App, on_redis: Run) -> None:
    handle = app.send_task("tests.sample_tasks.add", (2, 3))  # no worker: stays pending
    result = on_redis("inspect", handle.id)
    assert result.returncode == 0, result.stderr
    assert "state: PENDING" in result.stdout


def test_inspect_unknown_id(on_redis: Run) -> None:
    result = on_redis("inspect", "no-such-task-id")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no-such-task-id" in one_error_line(result)


def test_cancel_queued_running_and_unknown(
    app: App, on_redis: Run, tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    queued = app.send_task("tests.sample_tasks.add", (2, 3))  # no worker yet
    result = on_redis("cancel", queued.id)
    assert result.returncode == 0, result.stderr
    assert "revoked" in result.stdout
    with pytest.raises(nbtask.TaskRevoked):
        queued.get(timeout=10)

    start_worker(concurrency=1)
    marker, go = tmp_path / "marker", tmp_path / "go"
    running = app.send_task("tests.sample_tasks.wait_for_file", (str(marker), str(go)))
    try:
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the task did not start"
        result = on_redis("cancel", running.id, "--grace", "1")
        assert result.returncode == 0, result.stderr
        assert "interrupt sent" in result.stdout
        with pytest.raises(nbtask.TaskRevoked):
            running.get(timeout=10)
    finally:
        go.touch()

    result = on_redis("cancel", "no-such-task")
    assert result.returncode == 1
    assert "no-such-task" in one_error_line(result)


def test_inspect_log_and_cancel_take_a_unique_id_prefix(app: App, on_redis: Run) -> None:
    handle = app.send_task("tests.sample_tasks.add", (2, 3))  # no worker: stays pending
    app.store.append_journal(handle.id, ["INFO said about it"])
    short = handle.id[:8]  # as %tasks and the waiting lines show it

    fields = fields_of(on_redis("inspect", short))
    assert (fields["id"], fields["state"]) == (handle.id, "PENDING")
    logged = on_redis("log", short)
    assert logged.returncode == 0, logged.stderr
    assert logged.stdout == "INFO said about it\n"
    cancelled = on_redis("cancel", short)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"{handle.id}: revoked\n"
    with pytest.raises(nbtask.TaskRevoked):
        handle.get(timeout=10)


def test_an_id_prefix_of_several_tasks_or_none_is_one_error_line(app: App, on_redis: Run) -> None:
    for task_id in ("feedface0a", "feedface0b"):
        app.send_task("tests.sample_tasks.add", (2, 3), task_id=task_id)
    for command in ("inspect", "log", "cancel"):
        several = on_redis(command, "feedface")
        assert several.returncode == 1
        assert one_error_line(several) == (
            f"nbtask {command}: 'feedface' begins the ids of several tasks (feedface0a, "
            "feedface0b): give more of the id"
        )
        none = on_redis(command, "0123456789abcdef")
        assert none.returncode == 1
        assert "'0123456789abcdef' in the result store, nor one whose id begins with it" in (
            one_error_line(none)
        )
        short = on_redis(command, "feed")  # fewer than 8 characters: no prefix
        assert short.returncode == 1
        assert "nor one whose id" not in one_error_line(short)
    assert on_redis("cancel", "feedface0a").returncode == 0  # the whole id
