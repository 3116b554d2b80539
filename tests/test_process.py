"""The process helpers: Ctrl-C held back while a step must not stop half done; the pid."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from nbtask._process import current_pid, interrupts_held


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
