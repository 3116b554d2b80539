"""Reliability under load and faults on both brokers: nothing lost, nothing run twice."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import client_env
from raw_broker import RawBroker, raw_broker

import nbtask
from nbtask import App, Settings, State
from nbtask._text import redact_url

pytestmark = pytest.mark.brokers


def test_poison_message_is_redelivered_up_to_the_cap_then_dead_lettered(
    app: App, start_worker, tmp_path: Path, settings: Settings
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
    raw = raw_broker(settings)
    try:
        dead = raw.dead_letters()
        assert len(dead) == 1 and int(dead[0][b"n"]) == app.settings.max_redeliveries
        assert raw.drained()
    finally:
        raw.close()


@pytest.mark.timeout(600)  # (10,000 tasks on a busy machine; each wait below is bounded)
def test_load_from_four_clients_nothing_lost_nothing_twice(
    settings: Settings, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nbtask's own heartbeat (1 s) and visibility timeout (10 s), not the suite's 0.2 s and
    # 2 s: nothing here fails on purpose, and a supervisor the load starves of the CPU
    # for 2 s would have the tasks its children run taken for lost.
    monkeypatch.setenv("NBTASK_HEARTBEAT_INTERVAL", "1.0")  # (the workers')
    monkeypatch.setenv("NBTASK_VISIBILITY_TIMEOUT", "10.0")
    settings = settings.replace(heartbeat_interval=1.0, visibility_timeout=10.0)
    start_worker(concurrency=2)
    start_worker(concurrency=2)
    ledger = tmp_path / "ledger"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(_LOAD_CLIENT))
    started = time.monotonic()
    clients = [
        subprocess.Popen(
            [sys.executable, str(script), str(ledger), "2500"],
            env=client_env(settings),
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
        f"{redact_url(settings.broker_url or '')}: 10,000 tasks from 4 clients on 2 workers "
        f"x 2 children: {elapsed:.1f} s, client peak RSS {peak_rss:.0f} MiB"
    )


_LOAD_CLIENT = """
import resource
import sys
from nbtask import App, Settings

ledger, count = sys.argv[1:3]
app = App("load", settings=Settings.from_env())
handles = [app.send_task("tests.sample_tasks.record_id", (ledger,)) for _ in range(int(count))]
ids = [h.get(timeout=240) for h in handles]
rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(len(ids), len(set(ids)), f"{rss_mib:.1f}")
app.close()
"""


def test_client_gone_results_wait_for_re_attach(
    settings: Settings, start_worker, access: RawBroker, tmp_path: Path
) -> None:
    start_worker(concurrency=2)
    ids_file = tmp_path / "ids"
    script = tmp_path / "gone.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from nbtask import App, Settings
        app = App("gone", settings=Settings.from_env())
        ids = [app.send_task("tests.sample_tasks.add", (i, i)).id for i in range(20)]
        Path({str(ids_file)!r}).write_text("\\n".join(ids))
        os.kill(os.getpid(), signal.SIGKILL)  # gone without a word
    """)
    )
    gone = subprocess.run(
        [sys.executable, str(script)],
        env=client_env(settings),
        capture_output=True,
        text=True,
        check=False,
    )
    assert gone.returncode == -signal.SIGKILL, gone.stderr
    ids = ids_file.read_text().split()
    later = App("later", settings=settings)
    try:
        results = [later.handle(task_id).get(timeout=30) for task_id in ids]
    finally:
        later.close()
    assert results == [2 * i for i in range(20)]
    # Kept until result_ttl, then gone: every record carries that expiry.
    ttls = [access.store.ttl(access.keys.record_key(task_id)) for task_id in ids]
    assert all(0 < ttl <= settings.result_ttl for ttl in ttls), ttls
