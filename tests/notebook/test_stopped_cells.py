"""Stop on a ``--wait`` cell whose code sees the interrupt, as in a local kernel.

Stop raises ``KeyboardInterrupt`` in the running code: code that handles it goes on and
the cell ends as any other (with an error of its own if it raises one); code that does not
ends with it, after its ``finally`` blocks ran however long they take, the names bound so far
staying bound. A second Stop kills it.

A real IPython shell against the real Redis and worker processes.
"""

from __future__ import annotations

import pytest
from helpers import interrupt_once_printed, rendered, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import State
from nbtask.notebook.session import Session

_HANDLED = """\
import time
history = []
try:
    print('started', flush=True)
    for epoch in range(1200):
        history.append(epoch)
        time.sleep(0.05)
except KeyboardInterrupt:
    print('stopped early at', epoch)
final = len(history)
print('final', final)"""

_CLEANED_UP = """\
import time
saved = False
try:
    print('started', flush=True)
    for epoch in range(1200):
        time.sleep(0.05)
finally:
    print('saving checkpoint...', flush=True)
    time.sleep({cleanup})
    saved = True
    print('saved')"""

_REPLACED = """\
import time
try:
    print('started', flush=True)
    for epoch in range(1200):
        time.sleep(0.05)
except KeyboardInterrupt:
    raise ValueError(f'stopped at epoch {epoch}: no checkpoint was written')"""


def test_a_stop_the_cells_code_handles_ends_the_cell_as_a_normal_one(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupt_once_printed(ip)
    result = ip.run_cell(f"%%task --wait --out h\n{_HANDLED}")
    assert result.error_in_exec is None, result.error_in_exec
    epoch, final = ip.user_ns["epoch"], ip.user_ns["final"]
    assert ip.user_ns["history"] == list(range(final)) and final == epoch + 1
    printed = capsys.readouterr().out
    assert f"started\nstopped early at {epoch}\nfinal {final}\n" in printed, printed
    assert ip.user_ns["h"].state is State.SUCCESS


def test_a_stopped_cells_slow_cleanup_runs_to_its_end_and_its_names_come_back(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``finally`` longer than a terminate's grace is not killed while the user waits."""
    interrupt_once_printed(ip)
    with pytest.raises(KeyboardInterrupt) as info:
        ip.run_cell_magic("task", "--wait --out h", _CLEANED_UP.format(cleanup=7))
    assert rendered(info.value) == ["KeyboardInterrupt: task 'import time' cancelled"]
    assert ip.user_ns.get("saved") is True, "the cleanup did not end, or its names are lost"
    assert isinstance(ip.user_ns.get("epoch"), int)
    printed = capsys.readouterr().out
    assert "started\nsaving checkpoint...\nsaved\n" in printed, printed
    assert ip.user_ns["h"].state is State.REVOKED


def test_a_second_stop_kills_a_stopped_cells_cleanup_and_says_so(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupt_once_printed(ip)
    interrupt_once_printed(ip, "saving checkpoint")
    with pytest.raises(KeyboardInterrupt) as info:
        ip.run_cell_magic("task", "--wait --out h", _CLEANED_UP.format(cleanup=120))
    assert rendered(info.value) == [
        "KeyboardInterrupt: task 'import time' cancelled (killed at the second Stop)"
    ]
    said = capsys.readouterr()
    assert "saving checkpoint...\n" in said.out and "saved" not in said.out, said.out
    assert "nbtask: Stop pressed again: killing task 'import time'" in said.err, said.err
    assert "saved" not in ip.user_ns or ip.user_ns["saved"] is False
    handle = ip.user_ns["h"]
    wait_until(handle.done, 15, "the task to be killed")
    assert handle.state is State.REVOKED


def test_a_stop_the_cells_code_turns_into_an_error_of_its_own_shows_that_error(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    """As locally: the cell's own error, not "cancelled" (which said nothing of it)."""
    interrupt_once_printed(ip)
    result = ip.run_cell(f"%%task --wait --out h\n{_REPLACED}")
    error = result.error_in_exec
    assert isinstance(error, ValueError), repr(error)
    epoch = ip.user_ns["epoch"]
    assert str(error) == f"stopped at epoch {epoch}: no checkpoint was written"
    shown = "".join(rendered(error))
    assert "raise ValueError" in shown and "cancelled" not in shown, shown
    assert ip.user_ns["h"].state is State.FAILURE
