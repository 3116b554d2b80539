"""The text view of a task (``NBTASK_WIDGETS=0``) in a real kernel: what crosses iopub.

A frontend without widgets gets the task's output as displays under its cell. Each
repaint sends what is new, not all that was printed so far, and the cell shows the same
text as a single display holding it all would. A batch runner (a request that allows no
input, as nbclient's) gets that single display, made while the cell ran, updated in place.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import drain_until, execute, kernel_env, stream_text

from nbtask import Settings

ROUNDS, LINES, WIDTH = 80, 25, 100
LINE = "f'{i:>4} {k:>3} '.ljust(" + str(WIDTH - 1) + ", '.')"  # one line, as the cell makes it
# Lines printed, and a display updated by id as they are (a progress line, say).
CELL = (
    "%%task\nimport time\nfrom IPython.display import display\n"
    "progress = display('progress 0', display_id=True)\n"
    f"for i in range({ROUNDS}):\n"
    f"    print('\\n'.join({LINE} for k in range({LINES})))\n"
    "    progress.update(f'progress {i + 1}')\n"
    "    time.sleep(0.05)\n"
)
PRINTED = "".join(
    f"{i:>4} {k:>3} ".ljust(WIDTH - 1, ".") + "\n" for i in range(ROUNDS) for k in range(LINES)
)


class CellOutputs:
    """One cell's outputs as a frontend keeps them: displays added, then updated by id."""

    def __init__(self, msg_id: str) -> None:
        self.msg_id = msg_id
        self.outputs: list[tuple[str | None, str]] = []  # (display id, text)
        self.sent: list[int] = []  # the bytes of each display message

    def take(self, m: dict[str, Any]) -> None:
        kind, content = m["msg_type"], m["content"]
        if kind not in ("display_data", "update_display_data"):
            return
        self.sent.append(len(json.dumps(content)))
        display_id = (content.get("transient") or {}).get("display_id")
        text = str(content["data"].get("text/plain", ""))
        if kind == "update_display_data":
            self.outputs = [(i, text if i == display_id else t) for i, t in self.outputs]
        elif m["parent_header"].get("msg_id") == self.msg_id:
            self.outputs.append((display_id, text))

    def text(self) -> str:
        return "\n".join(text for _, text in self.outputs)


def ended(m: dict[str, Any]) -> bool:
    """Whether ``m`` shows the task's status line saying it succeeded."""
    text = m["content"].get("data", {}).get("text/plain", "")
    return m["msg_type"] == "update_display_data" and " SUCCESS" in text.partition("\n")[0]


@pytest.mark.parametrize("allow_stdin", [True, False], ids=["interactive", "batch"])
def test_text_fallback_in_a_kernel_without_widgets(
    settings: Settings, start_worker: Any, kernel: Any, allow_stdin: bool
) -> None:
    start_worker()
    _, kc = kernel({**kernel_env(settings), "NBTASK_WIDGETS": "0"})
    execute(kc, "%load_ext nbtask")
    msg_id, msgs, _ = execute(
        kc,
        "%%task\nimport time\nprint('line one')\ntime.sleep(1)\nprint('line two')\n6 * 7",
        allow_stdin=allow_stdin,
    )
    assert not [m for m in msgs if m["msg_type"] == "comm_open"], "no widget without widgets"
    cell = CellOutputs(msg_id)
    for m in [*msgs, *drain_until(kc, ended)]:
        cell.take(m)
    status, _, body = cell.text().partition("\n")
    assert status.startswith("[import time] SUCCESS") and body == "line one\nline two\n42"
    if not allow_stdin:  # all in the display made while the cell ran
        assert len(cell.outputs) == 1


def test_each_update_of_the_text_view_sends_only_what_is_new(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    start_worker()
    _, kc = kernel({**kernel_env(settings), "NBTASK_WIDGETS": "0"})
    execute(kc, "%load_ext nbtask")
    msg_id, msgs, _ = execute(kc, CELL)
    cell = CellOutputs(msg_id)
    for m in msgs:
        cell.take(m)
    for m in drain_until(kc, ended, timeout=60):
        cell.take(m)
    # What the cell shows: the status line, then everything printed, in order.
    status, _, body = cell.text().partition("\n")
    assert status.startswith("[import time] SUCCESS"), status
    assert body == f"'progress {ROUNDS}'\n" + PRINTED.rstrip("\n")
    # Sending it whole at each update sent ~40 times what was printed here.
    assert max(cell.sent) < 40_000, f"an update sent {max(cell.sent):,} bytes"
    assert sum(cell.sent) < 4 * len(PRINTED), (sum(cell.sent), len(PRINTED), len(cell.sent))


@pytest.mark.parametrize("off", ["false", "no", "off"])
def test_widgets_are_off_for_every_spelling_of_off(
    settings: Settings, kernel: Any, off: str
) -> None:
    _, kc = kernel({**kernel_env(settings), "NBTASK_WIDGETS": off})
    _, _, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    _, msgs, reply = execute(kc, "%tasks")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert not [m for m in msgs if m["msg_type"] == "comm_open"], "no widget with widgets off"
    assert "no tasks yet" in stream_text(msgs)
