"""A client that stops reading for a while still gets every outcome.

A client's channel keeps a bounded number of events (``CHANNEL_MAXLEN``): a notebook
whose process is stopped, or whose kernel holds the GIL in a long computation, while its
tasks end, finds the oldest events trimmed. The outcomes are still in the tasks' records.
The client here is a process of its own, stopped with SIGSTOP while its tasks run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from stopped_client import stopped_client, stopped_while_tasks_end
from worker_process import WorkerProcess

from nbtask import Event, EventType, Settings
from nbtask.brokers import open_broker
from nbtask.brokers.redis_channels import CHANNEL_MAXLEN
from nbtask.wire.envelope import Signer
from nbtask.worker.outbox import Outbox

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(600)]

#: More tasks than the channel keeps events, each with one event (its end).
TASKS = CHANNEL_MAXLEN + 1_000

#: The client's one log line on finding events trimmed unread (nbtask/client/event_reads.py).
TRIMMED = "events of this client were trimmed before it read them"

CLIENT = """
import concurrent.futures, sys
from nbtask import App

app = App("paused")
handles = [app.send_task("tests.sample_tasks.add", (i, 1)) for i in range({tasks})]
print("sent", flush=True)
sys.stdin.readline()  # the test stopped this process meanwhile, then let it go on
# However long a loaded machine takes to go through them all: given up only once a
# whole minute brought no outcome.
done, waiting = set(), set(handles)
while waiting:
    came, waiting = concurrent.futures.wait(waiting, timeout=60)
    if not came:
        break
    done |= came
right = sum(1 for i, h in enumerate(handles) if h in done and h.result() == i + 1)
print(f"ended {{len(done)}} right {{right}}", flush=True)
app.close()
"""


def test_a_client_stopped_while_more_tasks_ended_than_its_channel_keeps_gets_every_outcome(
    settings: Settings,
    broker_kind: str,
    start_worker: Callable[..., WorkerProcess],
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    client = CLIENT.format(tasks=TASKS)
    kept: list[int] = []

    def channel_kept() -> None:
        channels = r.keys(f"{settings.key_prefix}:c:*")  # the stopped client's alone
        kept.extend(r.xlen(channel) for channel in channels)

    out, err = stopped_while_tasks_end(
        client,
        settings,
        start_worker,
        r,
        tmp_path,
        tasks=TASKS,
        timeout=60,
        before_resume=channel_kept,
    )
    assert f"ended {TASKS} right {TASKS}" in out, out + err
    # Its channel (in the store, on RabbitMQ too) kept fewer events than the tasks sent.
    assert len(kept) == 1 and kept[0] < TASKS, kept
    # Redis: the client saw the gap and said so once. RabbitMQ: its reply queue kept them all.
    assert err.count(TRIMMED) == (1 if broker_kind == "redis" else 0), err


WATCHER = """
import json, sys, time
from nbtask import App

app = App("watching")
h = app.expect(sys.argv[1], "printer")
print(app.channel, flush=True)
while "first" not in h.stdout:
    time.sleep(0.01)
print("first", flush=True)
sys.stdin.readline()  # the test stopped this process meanwhile, then let it go on
h.get(timeout=120)
print(json.dumps({"stdout": h.stdout, "stderr": h.stderr}), flush=True)
app.close()
"""


def test_a_client_stopped_while_a_task_sent_more_than_its_channel_keeps_says_output_was_lost(
    settings: Settings, broker_kind: str, tmp_path: Path
) -> None:
    # A task that sends more events than a channel keeps while its client reads none:
    # sent by a worker's own outbox, one send per line (a long task printing now and then).
    task_id = uuid.uuid4().hex
    lines = CHANNEL_MAXLEN + 1_000
    with stopped_client(WATCHER, settings, tmp_path, task_id) as client:
        transport = open_broker(settings, settings.broker_url or "")
        signer = Signer.for_settings(settings, settings.secret)
        run = (settings.key_prefix, None)
        try:
            channel = client.readline()
            outbox = Outbox(transport, signer)
            outbox.begin(task_id, channel, {"worker": "w", "pid": 1}, run=run)
            outbox.write(EventType.STDOUT, "first\n")
            outbox.flush()
            assert client.readline() == "first"
            client.stop()
            for i in range(lines):
                outbox.write(EventType.STDOUT, f"{i}\n")
                outbox.flush()
            end = Event(EventType.SUCCESS, task_id, outbox.end(), {"worker": "w"}, run=run)
            transport.emit(channel, [signer.seal(end.to_header())])
            out, err = client.resume()
        finally:
            transport.close()
    assert out.strip(), err
    got = json.loads(out.strip().splitlines()[-1])
    everything = "first\n" + "".join(f"{i}\n" for i in range(lines))
    if broker_kind == "amqp":  # the reply queue kept every event
        assert (got["stdout"], got["stderr"]) == (everything, "")
        return
    # The oldest were trimmed unread: the output says where, in one line on stderr.
    assert got["stdout"].startswith("first\n") and got["stdout"].endswith(f"\n{lines - 1}\n")
    assert len(got["stdout"]) < len(everything)
    assert got["stderr"].count("\n") == 1
    assert got["stderr"].startswith("[nbtask: output lost here: ")
