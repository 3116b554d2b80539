"""What a careless user gets from ``%%task`` and ``%nbtask``: one line naming the mistake.

A real IPython shell against the real Redis. Each mistake must be refused before anything is
sent (or, once sent, end with one line saying why), never leave the notebook worse off.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from helpers import interrupt_once_printed, rendered, wait_until
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from tcp_proxy import TcpProxy

from nbtask import App, Settings, State
from nbtask.errors import BrokerUnavailable, CellError, TaskRevoked, WorkerLost
from nbtask.notebook.session import Session


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--timeout -1", r"--timeout: give a number of seconds > 0, not -1"),
        ("--timeout 0", r"--timeout: give a number of seconds > 0, not 0"),
        ("--retries -1", r"--retries: give a count >= 0, not -1"),
        ("--queue ''", r"--queue: '' is not a queue name"),
        ("--queue=", r"--queue: '' is not a queue name"),
        ("--out 1abc", r"--out: '1abc' is not a Python variable name"),
        ("--keep q --fetch q", r"--keep and --fetch both name 'q'"),
        ("--keep nothere", r"'nothere', which the cell does not assign"),
        ("wait", r"'wait' is the name of an option: write --wait; to name the cell"),
        ("queue", r"'queue' is the name of an option: write --queue"),
    ],
)
def test_an_option_no_one_can_mean_is_refused_with_one_line_before_sending(
    ip: InteractiveShell, loaded: Session, line: str, message: str
) -> None:
    with pytest.raises((UsageError, CellError), match=message):
        ip.run_cell_magic("task", f"--wait {line}", "q = 1")
    assert loaded.pending.runs == []
    assert "q" not in ip.user_ns


@pytest.mark.parametrize(
    ("line", "flag"),
    [("--keep q y", "--keep"), ("--fetch=q y", "--fetch"), ("--keep q --keep 'q2' y", "--keep")],
)
def test_a_second_name_after_keep_or_fetch_that_the_cell_assigns_is_refused(
    ip: InteractiveShell, loaded: Session, line: str, flag: str
) -> None:
    # y would be the cell's name, and the cell's y would not be kept (or fetched) as meant.
    with pytest.raises(CellError, match=rf"^{flag} takes one name: 'y' would name the cell"):
        ip.run_cell_magic("task", f"--wait {line}", "q = q2 = 1\ny = 2")
    assert loaded.pending.runs == []
    assert "y" not in ip.user_ns


def test_a_quoted_queue_is_the_queue_it_names(ip: InteractiveShell, nb: Session) -> None:
    ip.run_cell_magic("task", "--wait --queue 'default' --out h", "q = 1")
    assert ip.user_ns["q"] == 1 and ip.user_ns["h"].queue == "default"


def test_keep_or_fetch_of_a_name_the_cell_changes_in_place_is_accepted(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.user_ns["items"] = [1, 2]
    ip.run_cell_magic("task", "--wait --fetch items", "items.append(3)")
    assert ip.user_ns["items"] == [1, 2, 3]


def test_a_wait_timeout_says_in_one_line_what_the_cell_waited_for(
    ip: InteractiveShell, loaded: Session
) -> None:
    with pytest.raises(TimeoutError) as info:
        ip.run_cell_magic("task", "--wait --requires nosuchdata --timeout 3", "q = 1")
    assert rendered(info.value) == [f"TimeoutError: {info.value}"]
    assert "no live worker holds dataset 'nosuchdata'" in str(info.value)


def test_a_wait_timeout_ends_a_cell_that_prints_all_the_time(
    ip: InteractiveShell, loaded: Session, start_worker: Any
) -> None:
    """Output every few milliseconds must not keep a ``--wait --timeout`` cell waiting."""
    start_worker(concurrency=1)
    ip.run_cell_magic("task", "--wait", "warm = 1")  # the one child has started its shell
    cell = (
        "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end:\n"
        "    print('.', end='', flush=True)\n    time.sleep(0.01)"
    )
    with pytest.raises(TimeoutError) as info:
        ip.run_cell_magic("task", "--wait --timeout 2 --out h", cell)
    assert rendered(info.value) == [f"TimeoutError: {info.value}"]
    assert "did not finish within 2.0 s; cancelled" in str(info.value)
    handle = ip.user_ns["h"]
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED


@pytest.mark.parametrize("stops", [1, 2], ids=["one_stop", "second_stop_while_revoking"])
def test_interrupting_a_wait_cell_says_its_task_was_cancelled(
    ip: InteractiveShell, nb: Session, monkeypatch: pytest.MonkeyPatch, stops: int
) -> None:
    if stops == 2:
        stop_again_when_revoking(nb, monkeypatch)
    interrupt_once_printed(ip)
    with pytest.raises(KeyboardInterrupt) as info:
        ip.run_cell_magic(
            "task", "--wait --out h", "import time\nprint('started')\ntime.sleep(30)\nlate = 1"
        )
    # A second Stop while the first is acted on kills the task, as a kernel user expects.
    killed = " (killed at the second Stop)" if stops == 2 else ""
    assert rendered(info.value) == [f"KeyboardInterrupt: task 'import time' cancelled{killed}"]
    handle = ip.user_ns["h"]
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED


def interrupt_once_waiting_in(function: str, *, again_if_lost: bool = False) -> None:
    """SIGINT to this process once its main thread waits inside ``function`` (the Stop button).

    ``again_if_lost``: again while it still waits there a while later. Python drops a
    KeyboardInterrupt raised inside a finaliser (a socket's, collected meanwhile), as it
    would a user's first Stop; only for a wait that a first one always ends.
    """
    main = threading.main_thread().ident

    def waiting() -> bool:
        frame = sys._current_frames().get(main or 0)
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
        return False

    def interrupt() -> None:
        wait_until(waiting, 30, f"the main thread to wait in {function}")
        for _ in range(100 if again_if_lost else 1):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            if not waiting():
                return

    threading.Thread(target=interrupt, daemon=True).start()


def test_interrupting_a_cell_that_waits_for_a_pending_name_says_its_task_was_cancelled(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell_magic("task", "--out h", "import time\ntime.sleep(30)\nlate = 1")
    interrupt_once_waiting_in("wait_interruptibly")
    result = ip.run_cell("print(late)")
    error = result.error_in_exec
    assert isinstance(error, KeyboardInterrupt), error
    assert rendered(error) == ["KeyboardInterrupt: task 'import time' cancelled"]
    handle = ip.user_ns["h"]
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED
    assert ip.run_cell("print('the next cell runs')").success


def test_interrupting_a_wait_cell_while_its_values_are_shipped_shows_no_nbtask_frames(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell("import numpy as np\nbig = np.ones(50_000_000)")  # 400 MB: hashed a while
    interrupt_once_waiting_in("digest_of", again_if_lost=True)
    with pytest.raises(KeyboardInterrupt) as info:
        ip.run_cell_magic("task", "--wait", "total = float(big.sum())")
    assert rendered(info.value) == ["KeyboardInterrupt"]
    assert "total" not in ip.user_ns
    assert ip.run_cell("print('the next cell runs')").success


def test_interrupting_the_fetch_of_a_kept_value_says_so_in_one_line(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell_magic(
        "task", "--wait", "import numpy as np\nx = np.ones(30_000_000)"
    )  # 240 MB: kept on the workers, fetched a while
    interrupt_once_waiting_in("fetch")
    result = ip.run_cell("y = x[:3]")
    error = result.error_in_exec
    assert isinstance(error, KeyboardInterrupt), error
    assert rendered(error) == [
        "KeyboardInterrupt: fetching x was interrupted: it is still the reference"
    ]
    assert type(ip.user_ns["x"]).__name__ == "RemoteValue"


def test_two_background_cells_from_one_random_state_are_told_their_draws_repeat(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell("import numpy as np\nnp.random.seed(0)")
    ip.run_cell_magic(
        "task", "", "import time\nimport numpy as np\na = np.random.random()\ntime.sleep(2)"
    )
    capsys.readouterr()
    ip.run_cell_magic("task", "", "import numpy as np\nb = np.random.random()")
    said = capsys.readouterr().err
    assert "'import numpy as np' starts from the same random state as 'import time'" in said
    ip.run_cell("pair = (a, b)")  # waits for both, and the notebook's state moves on
    assert ip.user_ns["pair"][0] == ip.user_ns["pair"][1]  # what was said
    capsys.readouterr()
    ip.run_cell_magic("task", "", "import numpy as np\nc = np.random.random()")
    ip.run_cell_magic("task", "", "d = 1  # draws nothing")
    assert "same random state" not in capsys.readouterr().err


def test_reading_a_name_of_a_cancelled_cell_says_so_in_one_line(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell_magic("task", "--out h", "import time\nprint('started')\ntime.sleep(30)\nlate = 1")
    handle = ip.user_ns["h"]
    wait_until(lambda: "started" in handle.stdout, 30, "the cell to start")
    handle.cancel()  # its Cancel button
    wait_until(handle.done, 15, "the task to stop")
    error = ip.run_cell("print(late)").error_in_exec
    assert isinstance(error, TaskRevoked), error
    assert rendered(error) == [
        f"TaskRevoked: task 'import time' [{handle.id[:8]}] was cancelled (terminated) before "
        "it ended: run the cell again to set late"
    ]
    assert ip.user_ns["time"].sleep, "what it bound before it was stopped stays, as locally"


def test_reading_a_name_of_a_cell_whose_worker_died_names_the_cell_and_the_name(
    ip: InteractiveShell, nb: Session
) -> None:
    ip.run_cell_magic(
        "task", "train --out h", "import os, time\nprint('started')\ntime.sleep(30)\nmodel = 1"
    )
    handle = ip.user_ns["h"]
    wait_until(lambda: "started" in handle.stdout and handle.info.get("pid"), 30, "its start")
    os.kill(int(handle.info["pid"]), signal.SIGKILL)
    wait_until(handle.done, 30, "its worker to report it lost")
    error = ip.run_cell("print(model)").error_in_exec
    assert isinstance(error, WorkerLost), error
    assert rendered(error) == [
        f"WorkerLost: task 'train' [{handle.id[:8]}] did not end: the worker process running "
        f"it was lost (its worker process {handle.info['pid']} exited with code -9); run the cell "
        "again to set model"
    ]


def test_unloading_with_a_cell_still_running_says_its_values_will_not_arrive(
    ip: InteractiveShell, nb: Session, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell_magic("task", "--out h", "import time\ntime.sleep(3)\nlate = 1")
    capsys.readouterr()
    ip.run_line_magic("unload_ext", "nbtask")
    said = capsys.readouterr().err
    handle = ip.user_ns["h"]
    assert (
        f"cancelling 1 cell(s) still running on the workers ('import time' [{handle.id[:8]}])"
        in (said)
    )
    assert "will not reach this notebook" in said and "%tasks --all" in said
    # As said: cancelled, not left running (this session no longer hears of it: another
    # client reads its record).
    other = App("check", settings=settings)
    try:
        again = other.handle(handle.id)
        wait_until(again.done, 15, "the cell to be cancelled")
        assert again.state is State.REVOKED
    finally:
        other.close()


def test_a_cell_whose_only_worker_was_killed_says_so_instead_of_running_on(
    ip: InteractiveShell, loaded: Session, start_worker: Any
) -> None:
    """The whole worker ``kill -9``: no worker is left to report the task lost, so say why."""
    worker = start_worker(concurrency=1)
    ip.run_cell_magic("task", "--out h", "import time\nprint('started')\ntime.sleep(60)\nx = 1")
    handle = ip.user_ns["h"]
    wait_until(lambda: "started" in handle.stdout, 30, "the cell to start")
    assert handle.waiting_reason is None  # its worker is alive
    worker.kill_whole()
    lost = "stopped sending heartbeats: it is settled once a worker of queue 'default' runs"
    wait_until(lambda: lost in (handle.waiting_reason or ""), 30, "the notice")
    view = loaded.views[handle.id]
    wait_until(lambda: lost in view.status_text(), 5, "the cell's view to say so")
    assert lost in loaded.status()  # %nbtask status


@pytest.fixture
def not_redis() -> Iterator[str]:
    """A port where a web server answers, as a mistyped host:port may find."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            try:
                peer, _ = server.accept()
            except OSError:
                return
            with peer:
                peer.recv(1024)
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not-a-url", "unsupported broker URL 'not-a-url'"),
        ("redis://127.0.0.1:1/0", "cannot reach the Redis"),
        ("not_redis", "does not speak Redis"),
    ],
)
def test_a_connect_that_fails_says_why_and_keeps_the_notebook_connected(
    ip: InteractiveShell, nb: Session, url: str, message: str, request: Any
) -> None:
    before = nb.app
    if url == "not_redis":
        url = request.getfixturevalue("not_redis")
    with pytest.raises(UsageError, match=f"%nbtask connect: .*{message}"):
        ip.run_line_magic("nbtask", f"connect {url}")
    assert nb.app is before
    ip.run_line_magic("nbtask", "status")
    ip.run_cell_magic("task", "--wait", "still = 1")
    assert ip.user_ns["still"] == 1


def test_a_connect_without_a_secret_names_the_magics_ways_to_give_one(
    ip: InteractiveShell,
    loaded: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    before = loaded.app
    monkeypatch.delenv("NBTASK_SECRET")
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("nbtask", f"connect {settings.broker_url}")
    said = str(info.value)
    assert said.startswith("%nbtask connect: no secret is set")
    assert "%nbtask connect URL --secret-file FILE" in said and "%env NBTASK_SECRET" in said
    assert "secret=" not in said.replace("NBTASK_SECRET=", ""), "no App argument named"
    assert loaded.app is before
    monkeypatch.setenv("HOME", str(tmp_path))  # IPython passes ``~`` on as it is
    (tmp_path / ".nbtask-secret").write_text(f"{settings.secret}\n")
    ip.run_line_magic("nbtask", f"connect {settings.broker_url} --secret-file ~/.nbtask-secret")
    assert loaded.app is not before and loaded.app.settings.secret == settings.secret


def test_a_cell_sent_while_the_broker_is_down_says_so_in_one_line(
    ip: InteractiveShell, loaded: Session, redis_url: str
) -> None:
    proxy = TcpProxy("127.0.0.1", urlparse(redis_url).port or 6379)
    proxy.start()
    try:
        ip.run_line_magic("nbtask", f"connect redis://127.0.0.1:{proxy.url_port}/0")
        proxy.refuse()
        with pytest.raises(BrokerUnavailable) as info:
            ip.run_cell_magic("task", "--wait", "q = 1")
        assert rendered(info.value) == [f"BrokerUnavailable: {info.value}"]
        assert "cannot reach the Redis broker" in str(info.value)
        assert "q" not in ip.user_ns
    finally:
        proxy.accept_again()  # the session closes cleanly
        ip.run_line_magic("unload_ext", "nbtask")
        proxy.stop()


def test_a_cell_that_does_not_parse_names_its_line_as_the_notebook_counts(
    ip: InteractiveShell, loaded: Session
) -> None:
    """Python's own SyntaxError, as the notebook would raise for the cell, at its line there."""
    with pytest.raises(SyntaxError) as info:
        ip.run_cell_magic("task", "--wait", "q = 1\nprint(q")
    assert (info.value.msg, info.value.lineno) == ("incomplete input", 3)
    assert info.value.filename == f"Cell In[{ip.execution_count}]"
    assert loaded.pending.runs == []


@pytest.mark.parametrize(
    ("cell", "why", "line", "bound"),
    [
        ("q = 1\nreturn q", "'return' outside function", 3, 1),
        ("yield 1", "'yield' outside function", 2, None),
        ("for q in [2]:\n    pass\nbreak", "'break' outside loop", 4, 2),
        ("nonlocal q", "nonlocal declaration not allowed at module level", 2, None),
    ],
)
def test_a_statement_that_parses_but_cannot_compile_fails_once_those_before_it_ran(
    ip: InteractiveShell, nb: Session, cell: str, why: str, line: int, bound: int | None
) -> None:
    """As a kernel compiles and runs a cell one statement at a time: its SyntaxError after."""
    with pytest.raises(SyntaxError) as info:
        ip.run_cell_magic("task", "--wait", cell)
    assert (info.value.msg, info.value.lineno) == (why, line)
    assert info.value.filename == f"Cell In[{ip.execution_count}]"
    assert ip.user_ns.get("q") == bound


def stop_again_when_revoking(nb: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Stop reaches the kernel just as the first one's cancelling sends the revoke."""
    revoke = nb.app.revoke

    def stopped_again(*args: Any, **kwargs: Any) -> bool:
        os.kill(os.getpid(), signal.SIGINT)
        return revoke(*args, **kwargs)

    monkeypatch.setattr(nb.app, "revoke", stopped_again)


def test_two_stops_a_moment_apart_still_cancel_the_cell_a_pending_name_waits_for(
    ip: InteractiveShell, nb: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop_again_when_revoking(nb, monkeypatch)
    ip.run_cell_magic("task", "--out h", "import time\ntime.sleep(30)\nlate = 1")
    interrupt_once_waiting_in("wait_interruptibly")
    error = ip.run_cell("print(late)").error_in_exec
    assert isinstance(error, KeyboardInterrupt), error
    assert rendered(error) == ["KeyboardInterrupt: task 'import time' cancelled"]
    handle = ip.user_ns["h"]
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED


def test_a_background_cell_reading_a_pending_name_waits_for_it_and_stop_cancels_that_cell(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in a kernel, where the second cell would run after the first: it is sent once the
    # name arrives, with its value.
    ip.run_cell_magic("task", "load --out h", "import time\ntime.sleep(1)\ndf = 41")
    ip.run_cell_magic("task", "--out h2", "y = df + 1")
    assert ip.user_ns["h"].done()
    assert "nbtask: waiting for task 'load'" in capsys.readouterr().out
    run = ip.run_cell("print(y)")
    assert run.success and ip.user_ns["y"] == 42
    # Stop while it waits: as a kernel's Stop interrupts the cell running ahead of it.
    ip.run_cell_magic("task", "load --out h", "import time\ntime.sleep(30)\ndf = 1")
    sent = len(nb.pending.runs)
    interrupt_once_waiting_in("wait_interruptibly")
    error = ip.run_cell("%%task\nz = df + 1").error_in_exec
    assert isinstance(error, KeyboardInterrupt), error
    assert rendered(error) == ["KeyboardInterrupt: task 'load' cancelled"]
    wait_until(ip.user_ns["h"].done, 15, "the task to stop")
    assert ip.user_ns["h"].state is State.REVOKED
    assert len(nb.pending.runs) == sent  # the reading cell was not sent
    assert ip.run_cell("print('the next cell runs')").success


def test_a_stop_just_as_a_wait_cell_is_sent_cancels_its_task(
    ip: InteractiveShell, nb: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stop reaches the kernel after the task went out, before the cell follows it.
    check = nb.version_warnings.check

    def stopped(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        check(*args, **kwargs)

    monkeypatch.setattr(nb.version_warnings, "check", stopped)
    with pytest.raises(KeyboardInterrupt) as info:
        ip.run_cell_magic("task", "--wait --out h", "import time\ntime.sleep(30)\nlate = 1")
    assert rendered(info.value) == ["KeyboardInterrupt: task 'import time' cancelled"]
    handle = nb.pending.runs[-1].handle
    wait_until(handle.done, 15, "the task to stop")
    assert handle.state is State.REVOKED


def test_reading_a_name_of_a_failed_background_cell_says_which_cell_failed(
    ip: InteractiveShell, nb: Session
) -> None:
    # Before, the cell's KeyError alone, in the cell that read a name: nothing said where
    # it came from.
    ip.run_cell_magic("task", "load --out h", "small = 1\nraise KeyError('k')")
    handle = ip.user_ns["h"]
    wait_until(handle.done, 30, "the cell to fail")
    error = ip.run_cell("print(small)").error_in_exec
    assert isinstance(error, KeyError), error
    shown = rendered(error)
    assert shown[0] == (
        f"nbtask: task 'load' [{handle.id[:8]}], which assigns small, failed in the "
        "background; the names it bound before its error are set:"
    ), shown
    assert shown[-1] == "KeyError: 'k'", shown
    assert ip.run_cell("print(small)").error_in_exec is None  # bound before the error
