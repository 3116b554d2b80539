"""The process helpers: Ctrl-C held back while a step must not stop half done; the pid;
whether a process runs, and since when."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbtask._process import (
    boot_id,
    current_pid,
    interrupts_held,
    pid_runs,
    process_started,
    runs_here,
    start_ticks,
    this_place,
)


def test_ctrl_c_during_a_held_step_comes_once_the_step_is_done() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python handles a signal between two steps: it had many
        done.append("step")
    assert done == ["step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_step_without_ctrl_c_raises_nothing_and_elsewhere_holds_nothing() -> None:
    with interrupts_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    errors: list[BaseException] = []

    def in_a_thread() -> None:  # only the main thread gets signals, or may set handlers
        try:
            with interrupts_held():
                pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == []


def test_the_pid_kept_without_a_system_call_is_a_forked_childs_own() -> None:
    assert current_pid() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report what it sees, then leave at once
        os.write(write, f"{current_pid()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    try:
        seen, real = os.read(read, 100).decode().split()
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert seen == real == str(child)
    assert current_pid() == os.getpid()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_ended_but_not_reaped_does_not_run() -> None:
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_runs(child.pid)
        began = process_started(child.pid)
        assert began is not None and before - 1.0 <= began <= time.time() + 1.0
        child.kill()
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(") ")[2][0] != "Z":
            time.sleep(0.01)
        assert not pid_runs(child.pid)  # a zombie: its parent (this one) has not reaped it
    finally:
        child.kill()
        child.wait()
    assert not pid_runs(child.pid) and process_started(child.pid) is None
    assert len(boot_id()) == 36 and boot_id() == boot_id()


def test_start_ticks_tell_a_process_from_a_later_one_whatever_the_clock_did() -> None:
    """Told by when it started in ticks after boot, a running process is the one that
    registered even after the wall clock stepped an hour forward since (NTP after a
    resume: by wall-clock times it seemed to start after it registered, so its pid looked
    used again, and a paused live worker dead); another tick is another process."""
    here, me = this_place(), os.getpid()
    ticks = start_ticks(me)
    assert ticks is not None and ticks > 0
    began = process_started(me)
    assert began is not None
    an_hour_before = began - 3600  # what it registered, before the clock stepped an hour
    assert not runs_here(here, me, an_hour_before)  # (the wall clock alone cannot tell)
    assert runs_here(here, me, an_hour_before, ticks)
    assert not runs_here(here, me, 0.0, ticks + 1)
