"""The ``nbtask`` command given careless input: one clear error line, nothing left behind.

Each case is a real ``python -m nbtask`` process against the real services; what
``tests/test_cli.py`` already covers (no broker, a bad scheme, ``-c 0``...) is not repeated.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
import redis
from helpers import AMQP_URL, SECRET, amqp_reachable
from test_cli import one_error_line, run
from worker_process import WorkerProcess

from nbtask import App, ConfigurationError, Settings


def clean_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one error line of a failed command, which names every one of ``words``."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = one_error_line(result)
    for word in words:
        assert word in line, line
    return line


def usage_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one ``error:`` line argparse prints after its usage, naming ``words``."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# Broker URLs that reach the wrong thing ------------------------------------------------------
@pytest.mark.parametrize("command", [["status"], ["inspect", "x"], ["log", "x"], ["worker"]])
def test_redis_url_pointing_at_rabbitmq(command: list[str], prefix: str) -> None:
    amqp_reachable()  # something that is not Redis must answer on 5672
    url = "redis://127.0.0.1:5672/0"
    result = run(*command, "-b", url, "--key-prefix", prefix, env={"NBTASK_SECRET": SECRET})
    clean_error(result, "127.0.0.1:5672")
    assert result.stdout == ""  # a worker prints no banner for a broker it never reached


def test_database_out_of_range_is_an_error_not_an_empty_answer(prefix: str) -> None:
    url = "redis://127.0.0.1:6379/999999"
    result = run("status", "-b", url, "--key-prefix", prefix, env={"NBTASK_SECRET": SECRET})
    clean_error(result, "DB index is out of range (database 999999)", "0-15", "/0")


def test_status_reaches_the_amqp_broker_it_is_given(redis_url: str, prefix: str) -> None:
    nothing_there = AMQP_URL.replace(":5672", ":9")
    env = {"NBTASK_SECRET": SECRET, "NBTASK_RESULT_URL": redis_url}
    result = run("status", "-b", nothing_there, "--key-prefix", prefix, env=env)
    clean_error(result, "AMQP broker", "127.0.0.1:9")


@pytest.mark.parametrize(
    "url",
    [AMQP_URL.replace(":guest@", ":wrong-password@"), AMQP_URL.rstrip("/") + "/no-such-vhost"],
)
def test_amqp_login_or_vhost_refused_says_to_check_them(
    url: str, redis_url: str, prefix: str
) -> None:
    amqp_reachable()
    env = {"NBTASK_SECRET": SECRET, "NBTASK_RESULT_URL": redis_url}
    result = run("status", "-b", url, "--key-prefix", prefix, env=env)
    line = clean_error(result, "Check the user name, password and vhost in the URL")
    assert "Is RabbitMQ running" not in line  # it is: it answered, and refused
    assert "wrong-password" not in line


@pytest.mark.parametrize("login", [":wrong-password@", "someone:wrong-password@"])
def test_redis_login_refused_says_to_check_it(login: str, redis_url: str, prefix: str) -> None:
    url = redis_url.replace("redis://", f"redis://{login}")
    result = run("status", "-b", url, "--key-prefix", prefix, env={"NBTASK_SECRET": SECRET})
    line = clean_error(result, "Check the user name and password in the URL")
    assert "Is redis-server running" not in line  # it is: it answered, and refused
    assert "wrong-password" not in line


@pytest.mark.parametrize(
    ("url", "word"),
    [
        ("redis://127.0.0.1:abc/0", "port"),
        ("redis://127.0.0.1:99999/0", "port"),
        ("redis://127.0.0.1:6379/zero", "database number"),
    ],
)
def test_malformed_redis_url(url: str, word: str) -> None:
    result = run("status", "-b", url, env={"NBTASK_SECRET": SECRET})
    clean_error(result, word)


def test_option_before_the_command_says_where_it_goes() -> None:
    result = run("-b", "redis://127.0.0.1:6379/0", "status")
    usage_error(result, "-b goes after the command", "nbtask status -b")


# Options given empty: an error, never the environment's value or a default ------------------
@pytest.mark.parametrize(
    ("options", "env", "word"),
    [
        (["--key-prefix", ""], {}, "key_prefix"),
        (["--key-prefix", "a\tb"], {}, "key_prefix"),
        (["-b", ""], {"NBTASK_BROKER": "redis://127.0.0.1:6379/0"}, "broker URL ''"),
        (["--secret-file", ""], {}, "secret file"),
    ],
)
def test_empty_option_is_not_ignored(
    options: list[str], env: dict[str, str], word: str, redis_url: str
) -> None:
    broker = [] if "-b" in options else ["-b", redis_url]
    result = run("status", *broker, *options, env={"NBTASK_SECRET": SECRET, **env})
    clean_error(result, word)
    assert result.stdout == ""


# -Q: no queue, or nbtask's own ----------------------------------------------------------------
@pytest.mark.parametrize("queues", [",", " ", " , "])
def test_worker_queue_list_naming_no_queue(queues: str, redis_url: str, prefix: str) -> None:
    cli = ("-b", redis_url, "--key-prefix", prefix, "-c", "1")
    result = run("worker", *cli, "-Q", queues, env={"NBTASK_SECRET": SECRET}, timeout=30)
    clean_error(result, "names no queue", "-Q")
    assert not list(redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}:*"))


def test_purge_of_no_queue_leaves_the_default_queue_alone(
    app: App, redis_url: str, prefix: str
) -> None:
    waiting = app.send_task("tests.sample_tasks.add", (1, 2))
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run("purge", "-f", "-Q", " ", *cli, env={"NBTASK_SECRET": SECRET})
    clean_error(result, "names no queue")
    assert waiting.state == "PENDING"  # not purged, not revoked


def test_purge_with_nobody_to_answer_purges_nothing(app: App, redis_url: str, prefix: str) -> None:
    waiting = app.send_task("tests.sample_tasks.add", (1, 2))
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run("purge", *cli, env={"NBTASK_SECRET": SECRET}, stdin="")  # a script, cron
    clean_error(result, "pass -f")
    assert waiting.state == "PENDING"


@pytest.mark.parametrize("queue", ["data.iris", "held.someone-0"])
def test_worker_refuses_nbtasks_own_queue_names(queue: str, redis_url: str, prefix: str) -> None:
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run("worker", *cli, "-Q", f"default,{queue}", env={"NBTASK_SECRET": SECRET})
    clean_error(result, queue, "--data")


# -A and --data naming the wrong thing ------------------------------------------------------
def test_app_option_naming_a_plain_value(redis_url: str, prefix: str) -> None:
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run("worker", *cli, "-A", "os:sep", env={"NBTASK_SECRET": SECRET})
    clean_error(result, "-A os:sep", "not a module, an App or a task")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["-A", "json"], ["-A json", "found no nbtask task"]),
        (["--data", "d=os:getcwd", "--data", "d=os:getpid"], ["--data d=", "more than once"]),
        (["--data", "d=tests.sample_datasets:yielding"], ["--data 'd=", "generator function"]),
    ],
)
def test_worker_options_that_would_do_nothing(
    options: list[str], words: list[str], redis_url: str, prefix: str
) -> None:
    cli = ("-b", redis_url, "--key-prefix", prefix, "-c", "1")
    result = run("worker", *cli, *options, env={"NBTASK_SECRET": SECRET}, timeout=30)
    clean_error(result, *words)


def test_app_option_naming_one_task_registers_it(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("-A", "tests.celery_tasks:use_db", concurrency=1)
    banner = worker.log.read_text()
    assert "  . tests.celery_tasks.use_db" in banner, banner
    assert "  concurrency: 1 child process\n" in banner, banner  # not "1 child processes"


def test_celerys_spellings_of_a_worker_option_start_the_worker(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # celery -A proj.tasks.app worker -l info: an attribute after a dot, a lower-case -l.
    worker = start_worker("-A", "tests.celery_tasks.use_db", "-l", "debug", concurrency=1)
    banner = worker.log.read_text()
    assert "  . tests.celery_tasks.use_db" in banner, banner


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["-E", "-n", "w1@%h"], ["unrecognized arguments: -E -n w1@%h", "Celery worker options"]),
        (["--bogus"], ["unrecognized arguments: --bogus", "nbtask worker --help"]),
    ],
)
def test_a_worker_option_nbtask_does_not_have_names_the_command_and_its_help(
    options: list[str], words: list[str], redis_url: str, prefix: str
) -> None:
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run("worker", *cli, *options, env={"NBTASK_SECRET": SECRET})
    assert usage_error(result, *words).startswith("nbtask worker: error:")
    assert result.stdout == ""


def test_data_loader_module_that_fails_to_import(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "broken_data.py").write_text("raise RuntimeError('no data today')\n")
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run(
        "worker",
        *cli,
        "--data",
        "d=broken_data:load",
        env={"NBTASK_SECRET": SECRET},
        cwd=tmp_path,
    )
    clean_error(result, "--data 'd=broken_data:load'", "no data today")


def test_cluster_with_a_bad_app_leaves_no_server_directory(tmp_path: Path) -> None:
    result = run("cluster", "-A", "no_such_module", env={"TMPDIR": str(tmp_path)})
    clean_error(result, "no_such_module")
    assert list(tmp_path.iterdir()) == []  # no nbtask-* folder of a server started for nothing


# Seconds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("grace", ["-1", "nan", "inf"])
def test_cancel_grace_must_be_a_finite_number(grace: str, redis_url: str, prefix: str) -> None:
    cli = ("-b", redis_url, "--key-prefix", prefix)
    result = run("cancel", "some-id", *cli, f"--grace={grace}", env={"NBTASK_SECRET": SECRET})
    usage_error(result, "--grace", repr(grace))


@pytest.mark.parametrize("grace", [-1.0, math.nan, math.inf])
def test_revoke_grace_must_be_a_finite_number(grace: float, settings: Settings) -> None:
    app = App("careless", settings=settings)
    try:
        with pytest.raises(ConfigurationError, match="grace"):
            app.revoke("some-id", terminate=True, grace=grace)
    finally:
        app.close()


# nbtask run: checked before any kernel starts ----------------------------------------------
@pytest.fixture
def notebook(tmp_path: Path) -> Path:
    path = tmp_path / "one.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('ran')")]
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_run_timeout_must_be_positive(notebook: Path, timeout: str) -> None:
    result = run("run", str(notebook), f"--timeout={timeout}")
    usage_error(result, "--timeout")
    assert not notebook.with_suffix(".out.ipynb").exists()


@pytest.mark.parametrize(
    ("options", "env", "word"),
    [
        (["-o", "no/such/folder/out.ipynb"], {}, "no/such/folder"),
        (["-o", ""], {}, "-o '' is not a file name"),
        (["-o", "."], {}, "-o '.' is not a file name"),
        (["-b", "http://example.com"], {}, "unsupported broker URL"),
        (["-b", "redis://127.0.0.1:6379/0"], {}, "NBTASK_SECRET"),
        ([], {"NBTASK_BROKER": "redis://127.0.0.1:abc/0"}, "port"),
    ],
)
def test_run_checks_its_options_before_running(
    notebook: Path, options: list[str], env: dict[str, str], word: str
) -> None:
    result = run("run", str(notebook), *options, env=env, cwd=notebook.parent)
    clean_error(result, word)
    assert "ran" not in result.stdout  # no cell was run for nothing
    assert sorted(p.name for p in notebook.parent.iterdir()) == ["one.ipynb"]
