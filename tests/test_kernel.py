"""Through a real kernel (jupyter_client): widgets on iopub, background updates, pending names."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from nbtask import Settings

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def kc(settings: Settings, start_worker: Any) -> Iterator[Any]:
    start_worker()
    env = dict(__import__("os").environ)
    env.update(settings.to_env())
    env.update({"NBTASK_BROKER": settings.broker_url or "", "NBTASK_SECRET": settings.secret or ""})
    km = KernelManager(kernel_name="python3", transport="ipc")
    km.start_kernel(env=env, cwd=str(ROOT))
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=30)
    yield client
    client.stop_channels()
    km.shutdown_kernel(now=True)


def execute(kc: Any, code: str, timeout: float = 60) -> tuple[str, list[dict[str, Any]], Any]:
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=timeout)
    msgs = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        msgs.append(m)
        if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"):
            return msg_id, msgs, reply


def drain_until(kc: Any, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> list[Any]:
    msgs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        msgs.append(m)
        if pred(m):
            return msgs
    raise AssertionError(f"timed out; got {[m['msg_type'] for m in msgs]}")


def stream_text(msgs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


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

    later = drain_until(kc, lambda m: m["msg_type"] == "comm_msg"
                        and m["content"]["comm_id"] == badge
                        and "SUCCESS" in str(m["content"]["data"].get("state", {}).get("value")))
    updates = [m for m in later if m["msg_type"] == "comm_msg"]
    values = [m["content"]["data"]["state"]["value"] for m in updates
              if m["content"]["comm_id"] == bar and "value" in m["content"]["data"]["state"]]
    assert values and values[-1] == 6.0
    assert values == sorted(values)
    outputs = [m["content"]["data"]["state"]["outputs"] for m in updates
               if "outputs" in m["content"]["data"]["state"]]
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
    button = next(m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"
                  and m["content"]["data"]["state"]["_model_name"] == "ButtonModel")
    badge = next(m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"
                 and m["content"]["data"]["state"]["_model_name"] == "HTMLModel")
    drain_until(kc, lambda m: m["msg_type"] == "comm_msg"
                and "sleeping" in str(m["content"]["data"].get("state", {}).get("outputs")))
    content = {"method": "custom", "content": {"event": "click"}}
    click = kc.session.msg("comm_msg", {"comm_id": button, "data": content})
    kc.shell_channel.send(click)
    drain_until(kc, lambda m: m["msg_type"] == "comm_msg"
                and m["content"]["comm_id"] == badge
                and "REVOKED" in str(m["content"]["data"].get("state", {}).get("value")))


def test_wait_cell_output_is_the_cells_own(kc: Any) -> None:
    execute(kc, "%load_ext nbtask")
    _, msgs, reply = execute(
        kc,
        "%%task --wait\nimport matplotlib.pyplot as plt\nprint('hello')\n"
        "plt.plot([1, 2])\nplt.show()\n6 * 7",
    )
    assert reply["content"]["status"] == "ok"
    kinds = [m["msg_type"] for m in msgs if m["msg_type"] in
             ("stream", "display_data", "execute_result")]
    assert kinds[0] == "stream" and "hello" in stream_text(msgs)
    assert any(m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]
               for m in msgs)
    result = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert result and result[0]["content"]["data"]["text/plain"] == "42"

    _, msgs, reply = execute(kc, "%%task --wait\nx = 1\nraise KeyError('missing')\n")
    errors = [m for m in msgs if m["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "KeyError"
    traceback = "\n".join(errors[0]["content"]["traceback"])
    assert "line 3" in traceback and "raise KeyError" in traceback, traceback
