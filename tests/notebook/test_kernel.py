"""Through a real kernel (jupyter_client): widgets on iopub, background updates, pending names."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from typing import Any

import psutil
import pytest
from helpers import (
    WIDGET_VIEW,
    drain_until,
    execute,
    exited,
    kernel_env,
    processes_mentioning,
    stream_text,
    wait_until,
    without_colours,
)

from nbtask import App, Settings, State


@pytest.fixture
def kc(settings: Settings, start_worker: Any, kernel: Any) -> Any:
    start_worker()
    return kernel(kernel_env(settings))[1]


def test_widget_updates_after_the_cell_and_pending_names(kc: Any) -> None:
    _, msgs, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "worker process" in stream_text(msgs)

    started = time.monotonic()
    _, msgs, _ = execute(
        kc,
        "%%task slow\nimport time, nbtask\nfor i in nbtask.track(range(6), message='ticking'):\n"
        "    print('tick', i)\n    time.sleep(0.5)\nresult = 42\nresult",
    )
    assert time.monotonic() - started < 3, "a background cell returns at once"
    opens = {}
    for m in msgs:
        if m["msg_type"] == "comm_open":
            state = m["content"]["data"]["state"]
            opens.setdefault(state["_model_name"], []).append(m["content"]["comm_id"])
    assert "FloatProgressModel" in opens and "OutputModel" in opens
    bar = opens["FloatProgressModel"][0]
    badge = opens["HTMLModel"][0]

    # An independent cell runs at once, while the task still ticks.
    t0 = time.monotonic()
    _, msgs, _ = execute(kc, "print('independent')")
    assert time.monotonic() - t0 < 1.5 and "independent" in stream_text(msgs)

    later = drain_until(
        kc,
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == badge
            and "SUCCESS" in str(m["content"]["data"].get("state", {}).get("value"))
        ),
    )
    updates = [m for m in later if m["msg_type"] == "comm_msg"]
    values = [
        m["content"]["data"]["state"]["value"]
        for m in updates
        if m["content"]["comm_id"] == bar and "value" in m["content"]["data"]["state"]
    ]
    assert values and values[-1] == 6.0
    assert values == sorted(values)
    outputs = [
        m["content"]["data"]["state"]["outputs"]
        for m in updates
        if "outputs" in m["content"]["data"]["state"]
    ]
    printed = "".join(o.get("text", "") for out in outputs[-2:] for o in out)
    assert "tick 5" in printed

    # The value arrives on the main thread at the next cell.
    _, msgs, _ = execute(kc, "print(result + 1)")
    assert "43" in stream_text(msgs)


def test_pending_read_waits_and_cancel_button(kc: Any) -> None:
    execute(kc, "%load_ext nbtask")
    execute(kc, "%%task\nimport time\ntime.sleep(1.5)\nvalue = 7")
    _, msgs, _ = execute(kc, "print(value * 2)")
    text = stream_text(msgs)
    assert "waiting for task" in text and "14" in text

    _, msgs, _ = execute(kc, "%%task\nimport time\nprint('sleeping')\ntime.sleep(60)\nnever = 1")
    button = next(
        m["content"]["comm_id"]
        for m in msgs
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"]["_model_name"] == "ButtonModel"
    )
    badge = next(
        m["content"]["comm_id"]
        for m in msgs
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"]["_model_name"] == "HTMLModel"
    )
    drain_until(
        kc,
        lambda m: (
            m["msg_type"] == "comm_msg"
            and "sleeping" in str(m["content"]["data"].get("state", {}).get("outputs"))
        ),
    )
    content = {"method": "custom", "content": {"event": "click"}}
    click = kc.session.msg("comm_msg", {"comm_id": button, "data": content})
    kc.shell_channel.send(click)
    drain_until(
        kc,
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == badge
            and "REVOKED" in str(m["content"]["data"].get("state", {}).get("value"))
        ),
    )


def test_wait_cell_output_is_the_cells_own(kc: Any) -> None:
    execute(kc, "%load_ext nbtask")
    _, msgs, reply = execute(
        kc,
        "%%task --wait\nimport matplotlib.pyplot as plt\nprint('hello')\n"
        "plt.plot([1, 2])\nplt.show()\n6 * 7",
    )
    assert reply["content"]["status"] == "ok"
    kinds = [
        m["msg_type"] for m in msgs if m["msg_type"] in ("stream", "display_data", "execute_result")
    ]
    assert kinds[0] == "stream" and "hello" in stream_text(msgs)
    assert any(
        m["msg_type"] == "display_data" and "image/png" in m["content"]["data"] for m in msgs
    )
    result = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert result and result[0]["content"]["data"]["text/plain"] == "42"

    _, msgs, reply = execute(kc, "%%task --wait\nx = 1\nraise KeyError('missing')\n")
    errors = [m for m in msgs if m["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "KeyError"
    traceback = without_colours("\n".join(errors[0]["content"]["traceback"]))
    assert "line 3" in traceback and "raise KeyError" in traceback, traceback


def test_a_background_cells_failure_shows_in_its_widget_as_a_kernel_shows_it(kc: Any) -> None:
    """The widget shows IPython's coloured traceback, the cell's lines: an ``error`` output."""
    execute(kc, "%load_ext nbtask")
    _, msgs, _ = execute(kc, "x = 1\nraise KeyError('missing')")
    local = next(m["content"]["traceback"] for m in msgs if m["msg_type"] == "error")
    _, msgs, reply = execute(kc, "%%task failing\nx = 1\nraise KeyError('missing')")
    assert reply["content"]["status"] == "ok", "a background cell returns at once"
    opens = comm_opens(msgs)
    badge, outputs = opens["HTMLModel"][0], set(opens["OutputModel"])
    later = drain_until(kc, lambda m: m["msg_type"] == "update_display_data")
    assert any(
        m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == badge
        and "FAILURE" in str(m["content"]["data"]["state"].get("value"))
        for m in later
    )
    shown = [
        output
        for m in later
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] in outputs
        for output in m["content"]["data"]["state"].get("outputs", [])
    ]
    assert [o["output_type"] for o in shown] == ["error"], shown
    error = shown[0]
    assert (error["ename"], error["evalue"]) == ("KeyError", "'missing'")
    # As the kernel shows the cell's error locally: coloured, its frame the cell's lines.
    assert error["traceback"][0] == local[0] and error["traceback"][-1] == local[-1], error
    text = without_colours("\n".join(error["traceback"]))
    assert "Cell In[" in text and "----> 3 raise KeyError('missing')" in text, text
    # The same traceback a later cell reading its name raises.
    _, msgs, _ = execute(kc, "x")
    raised = next(m["content"]["traceback"] for m in msgs if m["msg_type"] == "error")
    assert raised[1:] == [line.rstrip("\n") for line in error["traceback"]], raised
    # A notebook saved now keeps the end as plain text beside the widget.
    saved = later[-1]["content"]["data"]["text/plain"]
    assert "[failing] FAILURE" in saved and "KeyError: 'missing'" in saved, saved
    assert "\x1b" not in saved, saved


def test_a_wait_cells_figure_comes_after_its_out_as_locally(kc: Any) -> None:
    """The inline backend draws a cell's figures once it has run: after its ``Out``."""
    execute(kc, "%load_ext nbtask\n%matplotlib inline\nimport matplotlib.pyplot as plt")
    cell = "print('drawing')\nplt.plot([1, 2, 3])\n6 * 7"
    orders = []
    for source in (cell, "%%task --wait\n" + cell):
        _, msgs, reply = execute(kc, source)
        assert reply["content"]["status"] == "ok", reply["content"]
        orders.append(
            [
                "png" if "image/png" in m["content"].get("data", {}) else m["msg_type"]
                for m in msgs
                if m["msg_type"] in ("stream", "display_data", "execute_result")
            ]
        )
    local, remote = orders
    assert local == ["stream", "execute_result", "png"]
    assert remote == local


def test_a_wait_cells_out_is_its_value_shown_by_the_kernel(kc: Any) -> None:
    """``_`` and ``Out[n]`` hold the value, and the kernel renders it, as locally."""
    execute(kc, "%load_ext nbtask")
    execute(
        kc,
        "import os\nclass Shown:\n    def _repr_html_(self):\n"
        "        return f'<b>shown by {os.getpid()}</b>'\nx = 21",
    )
    _, msgs, reply = execute(kc, "%%task --wait\nx * 2")
    assert reply["content"]["status"] == "ok", reply["content"]
    result = [m["content"] for m in msgs if m["msg_type"] == "execute_result"]
    assert result and result[0]["data"]["text/plain"] == "42"
    count = result[0]["execution_count"]
    _, msgs, _ = execute(kc, f"print(type(_).__name__, _ == 42, Out[{count}] == 42)")
    assert "int True True" in stream_text(msgs)
    _, msgs, _ = execute(kc, "%%task --wait\nShown()")
    result = [m["content"] for m in msgs if m["msg_type"] == "execute_result"]
    _, said, _ = execute(kc, "print(f'<b>shown by {os.getpid()}</b>', type(_).__name__)")
    assert result and stream_text(said) == f"{result[0]['data']['text/html']} Shown\n"


def comm_opens(msgs: list[dict[str, Any]]) -> dict[str, list[str]]:
    opens: dict[str, list[str]] = {}
    for m in msgs:
        if m["msg_type"] == "comm_open":
            state = m["content"]["data"]["state"]
            opens.setdefault(state["_model_name"], []).append(m["content"]["comm_id"])
    return opens


def test_embedded_cluster_in_a_kernel(kernel: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    _, kc = kernel(env)
    _, msgs, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "embedded cluster" in stream_text(msgs)
    execute(kc, "%%task\nimport os\nrows = [1, 2, 3]\nwhere = os.getpid()")
    _, msgs, _ = execute(kc, "import os\nprint(sum(rows), where != os.getpid())")
    assert "6 True" in stream_text(msgs)
    _, msgs, _ = execute(kc, "%nbtask status")
    assert "busy 0" in stream_text(msgs)
    _, msgs, reply = execute(kc, "%unload_ext nbtask")
    assert reply["content"]["status"] == "ok"


def _embedded_cluster_of(kernel_pid: int) -> psutil.Process | None:
    """The embedded cluster process a kernel started, once it runs."""
    for process in psutil.Process(kernel_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "--embedded" in process.cmdline():
                return process
    return None


def test_stop_while_the_embedded_cluster_starts_leaves_nothing_running(kernel: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    km, kc = kernel(env)
    execute(kc, "import nbtask.notebook.magics")  # the start is interrupted, not imports
    msg_id = kc.execute("%load_ext nbtask")
    wait_until(lambda: _embedded_cluster_of(km.provisioner.pid), 30, "the cluster to start")
    cluster = _embedded_cluster_of(km.provisioner.pid)
    assert cluster is not None
    # Its folder is in the command line of all it starts (its redis-server, its workers).
    directory = cluster.cmdline()[cluster.cmdline().index("--dir") + 1]
    km.interrupt_kernel()  # the notebook's Stop button
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:  # replies to earlier requests
        reply = kc.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "error", reply["content"]
    msgs = drain_until(
        kc,
        lambda m: (
            m["parent_header"].get("msg_id") == msg_id
            and m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
        ),
    )
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert [(e["ename"], e["traceback"]) for e in errors] == [
        ("KeyboardInterrupt", ["KeyboardInterrupt"])
    ], errors
    # Everything it had started is stopped, while the kernel runs on.
    wait_until(
        lambda: not processes_mentioning(directory) and not os.path.exists(directory),
        10,
        "the cluster's processes and folder to go",
    )
    assert exited(cluster.pid)

    _, msgs, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "embedded cluster" in stream_text(msgs)
    _, msgs, _ = execute(kc, "%%task --wait\nprint('ran after the stop')")
    assert "ran after the stop" in stream_text(msgs)
    execute(kc, "%unload_ext nbtask")


def test_display_updates_replace_and_elapsed_ticks(kc: Any) -> None:
    execute(kc, "%load_ext nbtask")
    _, msgs, _ = execute(
        kc,
        "%%task\nimport time\nfrom IPython.display import display\n"
        "h = display('step 0', display_id=True)\n"
        "for i in range(1, 4):\n    time.sleep(0.3)\n    h.update(f'step {i}')\n"
        "time.sleep(1.5)\nprint('end')",
    )
    opens = comm_opens(msgs)
    timing = opens["LabelModel"][1]  # detail, then timing

    def outputs_in(m: dict[str, Any]) -> Any:
        return m["content"].get("data", {}).get("state", {}).get("outputs")

    later = drain_until(
        kc, lambda m: m["msg_type"] in ("comm_open", "comm_msg") and "end" in str(outputs_in(m))
    )
    # What each Output widget shows last: the output comes in chunks, one per widget.
    last: dict[str, Any] = {}
    for m in msgs + later:
        if m["msg_type"] in ("comm_open", "comm_msg") and outputs_in(m) is not None:
            last[m["content"]["comm_id"]] = outputs_in(m)
    shown = [o["data"]["text/plain"] for chunk in last.values() for o in chunk if "data" in o]
    assert shown == ["'step 3'"], last  # one display, updated in place
    # The elapsed time moved while no event arrived (the 1.5 s sleep).
    times = [
        m["content"]["data"]["state"]["value"]
        for m in later
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == timing
        and "value" in m["content"]["data"].get("state", {})
    ]
    assert len(set(times)) >= 3, times

    _, msgs, _ = execute(
        kc,
        "%%task --wait\nfrom IPython.display import display\n"
        "h = display('first', display_id=True)\nh.update('second')",
    )
    # (The first cell's widget, once its task ended, may be updated now too: not this one's.)
    kinds = [
        m["msg_type"]
        for m in msgs
        if "display" in m["msg_type"] and WIDGET_VIEW not in m["content"].get("data", {})
    ]
    assert kinds == ["display_data", "update_display_data"], kinds


def test_exception_types_from_modules_are_reraised(kc: Any) -> None:
    execute(kc, "%load_ext nbtask")
    _, msgs, _ = execute(
        kc, "%%task --wait\nimport statistics\nraise statistics.StatisticsError('no data')"
    )
    errors = [m for m in msgs if m["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "StatisticsError", errors
    traceback = "\n".join(errors[0]["content"]["traceback"])
    assert "line 3" in traceback


def test_a_graceful_restart_leaves_background_cells_running(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    """JupyterLab's Restart shuts the kernel down gracefully (``atexit`` runs, unlike a
    kill): its background cells run on all the same, and end as they would have."""
    start_worker()
    km, kc = kernel(kernel_env(settings))
    execute(kc, "%load_ext nbtask")
    execute(kc, "%%task\nimport time\ntime.sleep(3)\nlater = 1")
    _, msgs, _ = execute(
        kc,
        "from nbtask.notebook.magics import session_of\n"
        "print(*(v.handle.id for v in session_of(get_ipython()).views.values()))",
    )
    (task_id,) = stream_text(msgs).split()
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=30)
    with App(settings=settings) as app:
        handle = app.handle(task_id)
        handle.get(timeout=60)
        assert handle.state is State.SUCCESS, handle.state


def test_restart_then_tasks_all_reattaches_and_replays(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    start_worker()
    km, kc = kernel(kernel_env(settings))
    execute(kc, "%load_ext nbtask")
    execute(kc, "%%task --wait\nprint('from before the restart')\nkept = 1")
    execute(kc, "%%task\nimport time\ntime.sleep(60)\nnever = 1")

    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=30)
    while True:  # drop what the old kernel left on iopub
        try:
            kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            break
    _, msgs, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    _, msgs, reply = execute(kc, "%tasks --all")
    assert reply["content"]["status"] == "ok", reply["content"]
    opens = comm_opens(msgs)
    buttons = [
        m["content"]["comm_id"]
        for m in msgs
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"].get("description") == "Open"
    ]
    assert "GridBoxModel" in opens and len(buttons) == 2
    _, msgs, _ = execute(
        kc,
        "from nbtask.notebook.magics import session_of\nimport time\n"
        "s = session_of(get_ipython())\n"
        "deadline = time.monotonic() + 15\n"
        "while any(v.state.value == 'PENDING' for v in s.views.values()) "
        "and time.monotonic() < deadline:\n    time.sleep(0.1)\n"
        "for v in s.views.values():\n    print(v.state.value, repr(v.handle.stdout))\n"
        "print(sorted(row.label for row in s.rows()))",
    )
    text = stream_text(msgs)
    assert "SUCCESS 'from before the restart\\n'" in text, text
    assert "STARTED" in text, text
    # The board names the cells as the old kernel did (their first lines).
    assert repr(["import time", "print('from before the restart')"]) in text, text

    # A row's Open button shows that task's widget under the board.
    boxes = opens["BoxModel"]
    first = buttons[0]
    content = {"method": "custom", "content": {"event": "click"}}
    click = kc.session.msg("comm_msg", {"comm_id": first, "data": content})
    kc.shell_channel.send(click)
    drain_until(
        kc,
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] in boxes
            and m["content"]["data"].get("state", {}).get("children")
        ),
    )
    # The still-running task from the old kernel can be cancelled from the new one.
    _, msgs, _ = execute(
        kc,
        "from nbtask.notebook.follow import cancel_task\nimport concurrent.futures, time\n"
        "v = [v for v in s.views.values() if not v.handle.done()][0]\n"
        "cancel_task(v.handle)\nconcurrent.futures.wait([v.handle], 20)\n"
        "time.sleep(0.3)\nprint(v.state.value)",
    )
    assert "REVOKED" in stream_text(msgs)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_task_help_alone_in_a_cell_points_at_the_line_magic(
    settings: Settings, kernel: Any, flag: str
) -> None:
    _, kc = kernel(kernel_env(settings))
    _, _, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    # IPython refuses an empty cell body before calling %%task: it names the line magic.
    _, _, reply = execute(kc, f"%%task {flag}")
    assert reply["content"]["status"] == "error"
    assert "Did you mean the line magic %task" in reply["content"]["evalue"]
    _, msgs, reply = execute(kc, f"%task {flag}")
    assert reply["content"]["status"] == "ok", reply["content"]
    out = stream_text(msgs)
    assert out.startswith("usage: %%task") and "--requires DATASET" in out
    # Without a help flag, %task says how %%task is used, and runs nothing.
    _, _, reply = execute(kc, "%task --wait\nnever = 1")
    assert reply["content"]["status"] == "error"
    assert "on the first line of a cell" in reply["content"]["evalue"]
    _, msgs, _ = execute(kc, "print('never' in globals())")
    assert stream_text(msgs).strip() == "False"
    # Unloaded, no %task is left pointing at a closed session.
    execute(kc, "%unload_ext nbtask")
    _, msgs, _ = execute(kc, f"%task {flag}")
    assert "Line magic function `%task` not found" in stream_text(msgs)
