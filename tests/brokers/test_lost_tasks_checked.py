"""A task is declared lost only when it is: the error says what is known of whether it ran.

A Redis without persistence restarts while a client process is stopped (its connection is
made again at once: no outage is seen), a task's record is deleted while its message is
still queued, a send a stalled Redis never read: each on a redis-server of the test's own,
with real worker processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from helpers import wait_until
from private_redis import PrivateRedis

from nbtask import App, BrokerUnavailable, TaskNotFound, errors
from nbtask.brokers.redis_link import RedisLink

# A client that sends four tasks, sees the first start, stops itself (SIGSTOP), and once
# continued waits for each; it writes how each ended to the file it is given. Each task
# says when it starts and ends in the file ``ran``.
_CLIENT = """
import json, os, signal, sys, time
from nbtask import App

url, ran, out = sys.argv[1:4]
app = App("stopped", broker=url, secret=os.environ["NBTASK_SECRET"])


@app.task(bind=True)
def rec(self, name, seconds, ran):
    with open(ran, "a") as f:
        f.write(f"start {name}\\n")
    time.sleep(seconds / 2)
    # A reader blocked when the client stopped is answered with this event, not the end.
    self.update_state(state="HALFWAY")
    time.sleep(seconds / 2)
    with open(ran, "a") as f:
        f.write(f"end {name}\\n")
    return name


hs = [rec.delay(f"r1-{i}", 2.0 if i == 0 else 0.5, ran) for i in range(4)]
app.flush()
deadline = time.monotonic() + 30
while hs[0].state != "STARTED" and time.monotonic() < deadline:
    time.sleep(0.01)
print("stopping", hs[0].state, flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
ended = []
for h in hs:
    try:
        ended.append([h.id, h.state, "result", repr(h.get(timeout=40))])
    except Exception as exc:
        ended.append([h.id, h.state, type(exc).__name__, str(exc)])
with open(out, "w") as f:
    json.dump(ended, f)
app.close()
"""


def _said(words: str, caplog: pytest.LogCaptureFixture) -> bool:
    return any(words in record.getMessage() for record in caplog.records)


def _process_state(pid: int) -> str:
    """The state letter of a process (``T`` when stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_client_stopped_while_redis_restarts_empty_is_told_honestly_what_was_lost(
    private_redis: PrivateRedis,
    tmp_path: Path,
    private_env: dict[str, str],
    private_processes: list[subprocess.Popen[bytes]],
    private_worker: Callable[..., subprocess.Popen[bytes]],
) -> None:
    ran, out, script = tmp_path / "ran", tmp_path / "ended.json", tmp_path / "client.py"
    script.write_text(_CLIENT)
    private_worker()
    client = subprocess.Popen(
        [sys.executable, str(script), private_redis.url, str(ran), str(out)],
        env=private_env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "client.log").open("wb"),
    )
    private_processes.append(client)
    assert client.stdout is not None
    assert client.stdout.readline().split() == [b"stopping", b"STARTED"]
    wait_until(lambda: _process_state(client.pid) == "T", 10, "the client to stop")
    wait_until(
        lambda: ran.exists() and ran.read_text().count("end ") == 4, 60, "all four tasks to run"
    )
    time.sleep(1.5)
    # Their final events and records are gone with the restart, unread by the client.
    private_redis.stop()
    private_redis.start()
    os.kill(client.pid, signal.SIGCONT)
    client.wait(120)
    ended = json.loads(out.read_text())
    said = "\n".join(str(e) for e in ended)
    assert [kind for _, _, kind, _ in ended] == ["TaskNotFound"] * 4, said
    # The one it saw start: where, and that whether it finished is unknown.
    first = ended[0][3]
    assert "started on worker" in first and "whether it finished is unknown" in first.lower()
    assert "restarted" in first, first
    # Those it saw queued: not "will not run: send it again", as if they never ran.
    for _, _, _, message in ended:
        assert "was lost by the broker" in message or "started on worker" in message
        assert "only if running it twice is acceptable" in message, message
    for _, _, _, message in ended[1:]:
        assert "may have run before a restart" in message and "restarted" in message, message
    runs = ran.read_text().split("\n")
    assert all(runs.count(f"start r1-{i}") == 1 for i in range(4)), runs


def test_a_task_whose_record_is_gone_but_message_is_queued_is_not_taken_for_lost(
    private_redis: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
    private_worker: Callable[..., subprocess.Popen[bytes]],
    private_app: Callable[[str], App],
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask")
    app = private_app("queued")
    raw = redis.Redis.from_url(private_redis.url)
    try:

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        queued = add.apply_async((1, 2), queue="later")  # no worker serves it yet
        parked = add.apply_async((3, 4), countdown=600)  # waits in the ETA set
        gone = add.apply_async((5, 6), queue="later")
        app.flush()
        # Records deleted (by anyone who can write to Redis); one message too, as if
        # Redis had never received it.
        raw.delete(*(app.store.record_key(h.id) for h in (queued, parked, gone)))
        entries = raw.xrange(app.transport.queue_key("later"))
        raw.xdel(app.transport.queue_key("later"), entries[-1][0])
        # A read error on the client (its connections killed): a look follows.
        caplog.clear()
        for _ in range(10):  # a connection killed between two reads is made again silently
            raw.client_kill_filter(_type="normal", skipme=True)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: _said("unreachable", caplog), 3, "a read error")
                break
        wait_until(lambda: _said("readable again", caplog), 30, "the listener to read again")
        with pytest.raises(TaskNotFound, match="was lost by the broker") as lost:
            gone.get(timeout=60)
        # Looked at twice by now, as the lost one was: the queued ones are left waiting.
        assert not queued.done(), queued.error
        assert not parked.done(), parked.error
        # Redis did not restart: the error does not say it did.
        said = str(lost.value)
        assert "never received it" in said and "a new run id" not in said, said
        assert "only if running it twice is acceptable" in said, said
        private_worker("later")
        assert queued.get(timeout=60) == 3
        assert not parked.done(), parked.error
    finally:
        raw.close()


def test_a_stalled_redis_is_said_to_have_been_sent_the_tasks_it_did_not_answer_for(
    private_redis: PrivateRedis, private_app: Callable[[str], App]
) -> None:
    app = private_app("stalled")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(0, 0)
    app.flush()
    private_redis.pause()
    try:
        handle = add.delay(1, 2)
        with pytest.raises(BrokerUnavailable) as info:
            handle.get(timeout=30)
    finally:
        assert private_redis.process is not None
        os.kill(private_redis.process.pid, signal.SIGCONT)
    raised = info.value
    assert isinstance(raised, errors.SendUnconfirmed), repr(raised)
    said = str(raised)
    # A stalled server reads nothing: it was sent the task, it did not take it.
    assert f"was sent task(s) {handle.id}" in said and " took " not in said, said


def test_a_link_counts_restarts_and_one_refused_info_still_connects(
    private_redis: PrivateRedis,
) -> None:
    def refuse_info() -> None:
        admin = redis.Redis.from_url(private_redis.url)
        admin.acl_setuser(
            "noinfo", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"]
        )
        admin.close()

    refuse_info()
    links = [
        RedisLink(private_redis.url, "broker"),
        RedisLink(f"redis://noinfo:pw@127.0.0.1:{private_redis.port}/0", "broker"),
    ]
    try:
        for link in links:
            assert link.run([("SET", "k", "1"), ("GET", "k")])[1] == b"1"
        private_redis.stop()
        private_redis.start()
        refuse_info()  # (the restarted server forgot its users)
        for link in links:
            wait_until(lambda link=link: _answers(link), 10, "the link to answer again")
        # The second never learns: a restart it cannot see is not counted.
        assert [link.runs.restarts for link in links] == [1, 0]
    finally:
        for link in links:
            link.close()


def _answers(link: RedisLink) -> bool:
    try:
        link.run([("PING",)])
    except Exception:
        return False
    return True


@pytest.mark.timeout(60)
def test_the_queue_scan_ends_on_entry_ids_past_what_a_lua_number_holds(
    app: App, r: redis.Redis
) -> None:
    """Entries planted with sequence numbers near 2**62 (anyone may add entries) are read
    page after page to the end, not read again for ever by the client looking for lost
    tasks (every handle of the client waited meanwhile)."""
    stream = app.transport.queue_key("planted")  # type: ignore[attr-defined]
    at = int(time.time() * 1000) + 1
    for k in range(1200):  # past two pages
        r.xadd(stream, {"x": "y"}, id=f"{at}-{2**62 + k}")
    r.xadd(stream, {"i": "queued-after-them"}, id=f"{at}-{2**62 + 5000}")
    found = app.transport.still_queued({"planted": ["queued-after-them", "nowhere"]})
    assert found == {"queued-after-them"}
