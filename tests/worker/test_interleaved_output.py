"""A task switching between stdout and stderr in a long loop: all its output, in order.

A worker sends what a task wrote within each rate cap as one send. Each switch between
stdout and stderr used to start an event of its own, so a loop printing a row and a
warning 20,000 times made some 40,000 events, more than a client's channel keeps
(``CHANNEL_MAXLEN``): a client that fell behind lost thousands of rows (and its final
``done``), with only a log line saying events were trimmed. The client here is a process
of its own, stopped with SIGSTOP while the task runs, so it reads only once all was sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from stopped_client import stopped_while_tasks_end
from worker_process import WorkerProcess

from nbtask import Settings

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(300)]

ROWS = 20_000

CLIENT = """
import json, sys
from nbtask import App

app = App("interleaved")
h = app.send_task("tests.sample_tasks.prints_and_warns", ({rows},))
print("sent", flush=True)
sys.stdin.readline()  # the test stopped this process meanwhile, then let it go on
value = h.get(timeout=120)
merged = []  # adjacent outputs of one kind joined: the task's output as it switched
for event in h.outputs:
    if merged and merged[-1][0] == event.type.value:
        merged[-1][1] += event.data["text"]
    else:
        merged.append([event.type.value, event.data["text"]])
print(json.dumps({{"value": value, "merged": merged}}), flush=True)
app.close()
"""


def test_a_task_switching_between_stdout_and_stderr_loses_no_output_of_a_client_behind(
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    client = CLIENT.format(rows=ROWS)
    out, err = stopped_while_tasks_end(
        client, settings, start_worker, r, tmp_path, tasks=1, timeout=120
    )
    assert out.strip(), err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["value"] == ROWS
    expected = []
    for i in range(ROWS):
        expected += [["stdout", f"row {i} ok\n"], ["stderr", f"row {i}: value clipped\n"]]
    expected.append(["stdout", "done\n"])
    merged = got["merged"]
    assert len(merged) == len(expected), f"{len(merged)} outputs of {len(expected)}: {err[-500:]}"
    assert merged == expected
    assert "trimmed" not in err
