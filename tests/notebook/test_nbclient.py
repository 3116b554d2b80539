"""A whole notebook through nbclient: cell outputs and the widget state saved with it."""

from __future__ import annotations

from typing import Any

import nbformat
import pytest
from helpers import ROOT, WIDGET_VIEW
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from nbtask import Settings

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def saved_outputs(state: dict[str, Any], model_id: str) -> list[dict[str, Any]]:
    """The outputs a frontend shows under a saved widget, walking the boxes it holds."""
    widget = state[model_id]["state"]
    if "outputs" in widget:
        return list(widget["outputs"])
    children = [c.removeprefix("IPY_MODEL_") for c in widget.get("children", [])]
    return [output for child in children for output in saved_outputs(state, child)]


def test_notebook_runs_with_tasks_and_saves_widget_state(
    settings: Settings, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker()
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NBTASK_BROKER", settings.broker_url or "")
    monkeypatch.setenv("NBTASK_SECRET", settings.secret or "")
    nb = new_notebook(
        cells=[
            new_code_cell("%load_ext nbtask"),
            new_code_cell("import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})"),
            new_code_cell(
                "%%task prep\nimport time\nfrom tqdm import tqdm\nfor i in tqdm(range(4)):\n"
                "    time.sleep(0.25)\ndf['b'] = df['a'] * 10\ntotal = int(df['b'].sum())\n"
                "print('total', total)"
            ),
            new_code_cell("print(total, list(df.columns))"),
            new_code_cell(
                "%%task --wait\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\n"
                "plt.show()\n'plotted'"
            ),
            # It fails while the next cell runs: its end is sent as that cell's reply.
            new_code_cell(
                "%%task broken\nimport time\ntime.sleep(1)\nraise ValueError('bad thing')"
            ),
            new_code_cell("import time\ntime.sleep(3)  # the widget's last repaint is saved"),
        ]
    )
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()

    assert "worker process" in nb.cells[0].outputs[0]["text"]
    view = next(o for o in nb.cells[2].outputs if WIDGET_VIEW in o.get("data", {}))
    # For frontends without widgets (a saved notebook opened elsewhere, nbconvert): the
    # end, as text. Before, the status line the widget was first shown with: PENDING.
    saved = view["data"]["text/plain"]
    assert saved.startswith("[prep] SUCCESS") and saved.endswith("total 30"), saved
    failed = next(o for o in nb.cells[5].outputs if WIDGET_VIEW in o.get("data", {}))
    saved = failed["data"]["text/plain"]
    assert saved.startswith("[broken] FAILURE"), saved
    assert "line 4" in saved and saved.endswith("ValueError: bad thing"), saved
    printed = "".join(o.get("text", "") for o in nb.cells[3].outputs)
    assert "waiting for task 'prep'" in printed and "30 ['a', 'b']" in printed
    kinds = {o["output_type"] for o in nb.cells[4].outputs}
    assert {"display_data", "execute_result"} <= kinds
    assert any("image/png" in o.get("data", {}) for o in nb.cells[4].outputs)

    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    box = state[view["data"][WIDGET_VIEW]["model_id"]]["state"]
    head_id = box["children"][0].removeprefix("IPY_MODEL_")
    head = state[head_id]["state"]["children"]
    badge_id, bar_id = (c.removeprefix("IPY_MODEL_") for c in head[:2])
    assert "SUCCESS" in state[badge_id]["state"]["value"]
    assert state[bar_id]["state"]["value"] == 4 and state[bar_id]["state"]["max"] == 4
    # The printed output is saved in the widgets under it (its chunks), in order.
    output_id = box["children"][2].removeprefix("IPY_MODEL_")
    printed_there = "".join(o.get("text", "") for o in saved_outputs(state, output_id))
    assert printed_there == "total 30\n"
    nbformat.validate(nb)
