"""Reliability under load and faults on the real Redis: nothing lost, nothing run twice."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import redis
from conftest import ROOT

import nbtask
from nbtask import App, Settings, State


def test_poison_message_is_redelivered_up_to_the_cap_then_dead_lettered(
    app: App, start_worker, tmp_path: Path, prefix: str, redis_url: str
) -> None:
    start_worker(concurrency=1)
    marker = tmp_path / "starts"
    handle = app.send_task("tests.sample_tasks.poison", (str(marker),), acks_late=True)
    try:
        handle.get(timeout=60)
        raise AssertionError("a poison message must not succeed")
    except nbtask.RemoteError as exc:
        assert exc.ename == "WorkerLost"
        assert "dead-letter" in exc.evalue
    assert handle.state is State.FAILURE
    starts = marker.read_text().split()
    # The first run plus max_redeliveries redeliveries, each in a new child.
    assert len(starts) == 1 + app.settings.max_redeliveries, starts
    assert len(set(starts)) == len(starts)
    client = redis.Redis.from_url(redis_url)
    dead = client.xrange(f"{prefix}:dead")
    assert len(dead) == 1 and int(dead[0][1][b"n"]) == app.settings.max_redeliveries
    assert client.xlen(f"{prefix}:q:default") == 0
    client.close()


def test_load_from_four_clients_nothing_lost_nothing_twice(
    settings: Settings, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    start_worker(concurrency=2)
    ledger = tmp_path / "ledger"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(_LOAD_CLIENT))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                settings.broker_url or "",
                settings.secret or "",
                settings.key_prefix,
                str(ledger),
                "2500",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [c.communicate(timeout=300) for c in clients]
    elapsed = time.monotonic() - started
    peak_rss = 0.0
    for client, (out, err) in zip(clients, outputs, strict=True):
        assert client.returncode == 0, err
        received, distinct, rss_mib = out.split()
        assert (int(received), int(distinct)) == (2500, 2500)
        peak_rss = max(peak_rss, float(rss_mib))
    runs = collections.Counter(ledger.read_text().split())
    assert len(runs) == 10_000, "tasks were lost"
    assert max(runs.values()) == 1, "a task ran twice"
    print(
        f"10,000 tasks from 4 clients on 2 workers x 2 children: {elapsed:.1f} s, "
        f"client peak RSS {peak_rss:.0f} MiB"
    )


_LOAD_CLIENT = """
import resource
import sys
from nbtask import App, Settings

url, secret, prefix, ledger, count = sys.argv[1:6]
settings = Settings(broker_url=url, secret=secret, key_prefix=prefix,
                    heartbeat_interval=0.2, visibility_timeout=2.0)
app = App("load", settings=settings)
handles = [app.send_task("tests.sample_tasks.record_id", (ledger,)) for _ in range(int(count))]
ids = [h.get(timeout=240) for h in handles]
rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(len(ids), len(set(ids)), f"{rss_mib:.1f}")
app.close()
"""


def test_client_gone_results_wait_for_re_attach(
    settings: Settings, start_worker, tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    ids_file = tmp_path / "ids"
    script = tmp_path / "gone.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from nbtask import App, Settings
        settings = Settings(broker_url={settings.broker_url!r}, secret={settings.secret!r},
                            key_prefix={settings.key_prefix!r})
        app = App("gone", settings=settings)
        ids = [app.send_task("tests.sample_tasks.add", (i, i)).id for i in range(20)]
        Path({str(ids_file)!r}).write_text("\\n".join(ids))
        os.kill(os.getpid(), signal.SIGKILL)  # gone without a word
    """)
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    gone = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=False
    )
    assert gone.returncode == -signal.SIGKILL, gone.stderr
    ids = ids_file.read_text().split()
    later = App("later", settings=settings)
    try:
        results = [later.handle(task_id).get(timeout=30) for task_id in ids]
    finally:
        later.close()
    assert results == [2 * i for i in range(20)]
