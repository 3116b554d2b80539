"""A large fetch into a real kernel shows its progress: bytes fetched out of the total.

Kernels started through jupyter_client against the real Redis and worker processes, with
``keep_threshold`` lowered to 1 MiB: a 2.4 MB kept value and a 5.6 MB result are "large".
Without a widget frontend (``NBTASK_WIDGETS=0``) the bar is text on stderr; in a kernel
where widgets may show, it is an ipywidgets bar.
"""

from __future__ import annotations

from typing import Any

from helpers import execute, kernel_env, stream_text

from nbtask import Settings

KEEP_X = "%%task --wait\nimport numpy as np\nx = np.arange(300_000.0)\n"
# 700,000 float64 (5.6 MB) is over the 4 MiB blob threshold: the result stays in the store
# until get() reads it.
LARGE_RESULT = (
    "import nbtask\n"
    "@nbtask.app().task\n"
    "def make(n):\n"
    "    import numpy as np\n"
    "    return np.arange(float(n))\n"
    "handle = make.delay(700_000)\n"
    "made = handle.get(timeout=60)\n"
    "print(len(made))\n"
)


def _start(settings: Settings, start_worker: Any, kernel: Any, **env: str) -> Any:
    start_worker()
    _, kc = kernel({**kernel_env(settings), "NBTASK_KEEP_THRESHOLD": str(1024 * 1024), **env})
    _, _, reply = execute(kc, "%load_ext nbtask")
    assert reply["content"]["status"] == "ok", reply["content"]
    return kc


def _stderr(msgs: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in msgs
        if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
    )


def test_fetches_show_a_text_bar_on_stderr_without_widgets(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    kc = _start(settings, start_worker, kernel, NBTASK_WIDGETS="0")
    execute(kc, KEEP_X)
    _, msgs, _ = execute(kc, "print(len(x))")  # a local cell that reads x fetches it
    assert "300000" in stream_text(msgs)
    bar = _stderr(msgs)
    assert "nbtask: fetching x [" in bar and "/ 2.4 MB (100%)" in bar
    assert "[" + "#" * 30 + "]" in bar  # drawn full once all bytes arrived

    _, msgs, _ = execute(kc, LARGE_RESULT)
    assert "700000" in stream_text(msgs)
    bar = _stderr(msgs)
    assert "nbtask: fetching the result of __main__.make[" in bar and "/ 5.6 MB (100%)" in bar


def test_small_fetches_show_no_bar(settings: Settings, start_worker: Any, kernel: Any) -> None:
    kc = _start(settings, start_worker, kernel, NBTASK_WIDGETS="0")
    execute(kc, "%%task --wait --keep small\nsmall = list(range(10))\n")
    _, msgs, _ = execute(kc, "print(small)")
    assert "[0, 1, 2" in stream_text(msgs) and "nbtask: fetching small [" not in _stderr(msgs)


def test_fetches_show_a_widget_bar_in_a_kernel_with_widgets(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    kc = _start(settings, start_worker, kernel)
    execute(kc, KEEP_X)
    _, msgs, _ = execute(kc, "y = x[:1]")
    bars = [
        m["content"]
        for m in msgs
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"].get("_model_name") == "FloatProgressModel"
        and m["content"]["data"]["state"].get("description") == "fetching"
    ]
    assert len(bars) == 1
    total = bars[0]["data"]["state"]["max"]
    values = [
        m["content"]["data"]["state"]["value"]
        for m in msgs
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == bars[0]["comm_id"]
        and "value" in m["content"]["data"].get("state", {})
    ]
    assert total > 2_400_000 and values and values[-1] == total
    labels = [
        m["content"]["data"]["state"]["value"]
        for m in msgs
        if m["msg_type"] in ("comm_open", "comm_msg")
        and m["content"]["data"].get("state", {}).get("_model_name", "LabelModel") == "LabelModel"
        and isinstance(m["content"]["data"].get("state", {}).get("value"), str)
    ]
    assert any(label.startswith("x: ") and "(100%)" in label for label in labels)
