"""RabbitMQ only: what a publisher sets beside a body never makes nbtask expand or re-code it.

kombu decompresses a body whose ``compression`` header names a codec as it receives the
message, and py-amqp decodes one whose ``content_encoding`` names a text encoding; anyone
with broker access sets both. nbtask never sends either, so a worker dead-letters such a
message as it arrived (one log line naming why) and serves on, and a client's listener
never inflates a body on its reply queue.

Memory is measured as the kernel's peak resident size (``VmHWM``) since a reset: a body
inflated and freed again leaves the current RSS where it was, but not the peak.
"""

from __future__ import annotations

import bz2
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import psutil
import pytest
from helpers import AMQP_URL, wait_until
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import App
from nbtask.brokers.amqp_reads import OVERSIZED_HEADER

pytestmark = pytest.mark.brokers("amqp")

ADD_TASK = "tests.sample_tasks.add"
MB = 1024 * 1024
GROWTH_LIMIT = 50 * MB


@pytest.fixture(scope="module")
def bz2_bomb() -> bytes:
    """``bz2.compress(b"\\0" * (600 * MB))``: well under 1 KB, 600 MB once decompressed.

    Compressed in 1 MB pieces (the same bytes) so this process never holds the 600 MB.
    """
    compressor = bz2.BZ2Compressor()
    piece = bytes(MB)
    bomb = b"".join(compressor.compress(piece) for _ in range(600)) + compressor.flush()
    assert len(bomb) < 1024, len(bomb)
    return bomb


@pytest.fixture
def publish() -> Iterator[Callable[..., None]]:
    """Publish raw bytes with any headers and content encoding, as anyone could."""
    with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
        channel = conn.channel()

        def send(
            routing_key: str, body: bytes, headers: dict[str, Any], encoding: str = "binary"
        ) -> None:
            message = channel.prepare_message(
                body,
                headers=headers,
                content_type="application/octet-stream",
                content_encoding=encoding,
            )
            channel.basic_publish(message, exchange="", routing_key=routing_key)

        yield send


def task_queue(app: App) -> str:
    return f"{app.settings.key_prefix}:q:default"


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def reset_peak_rss(pid: int) -> None:
    """Make the kernel's peak resident size of ``pid`` its current one (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    """The peak resident size of ``pid`` since its last reset, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def rejected_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log.read_text().splitlines() if "rejected message" in line]


def dead_bodies(access: RawBroker) -> list[bytes]:
    return [fields[b"e"] for fields in access.dead_letters()]


@pytest.mark.parametrize("compression", ["application/x-bz2", "application/x-gzip"])
def test_body_that_does_not_decompress_is_dead_lettered_and_the_worker_serves_on(
    compression: str,
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    publish: Callable[..., None],
) -> None:
    worker = start_worker(concurrency=1)
    children = {c.pid for c in worker.children()}
    body = b"not compressed with anything"
    publish(task_queue(app), body, {"compression": compression})

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the message to be dead-lettered")
    assert dead_bodies(access) == [body]
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4
    lines = rejected_lines(worker)
    assert len(lines) == 1 and f"compression ({compression!r})" in lines[0], lines
    log = worker.log.read_text()
    assert "broker unreachable" not in log and "Traceback" not in log, log
    assert {c.pid for c in worker.children()} == children, log
    assert access.drained()


@pytest.mark.parametrize("size", ["abc", 1.5, -1, {"a": 1}])
def test_a_forged_oversized_header_is_dead_lettered_and_the_worker_serves_on(
    size: object,
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    publish: Callable[..., None],
) -> None:
    # The header says which body a client's reader dropped unread for its size; anyone
    # can put it on a message, with anything in it.
    worker = start_worker(concurrency=1)
    publish(task_queue(app), b"junk", {OVERSIZED_HEADER: size})

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the message to be dead-lettered")
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4
    lines = rejected_lines(worker)
    assert len(lines) == 1 and OVERSIZED_HEADER in lines[0], lines
    assert "Traceback" not in worker.log.read_text()
    assert access.drained()


def test_bz2_bomb_on_a_task_queue_is_never_decompressed(
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    publish: Callable[..., None],
    bz2_bomb: bytes,
) -> None:
    worker = start_worker(concurrency=1)
    [child] = worker.children()
    assert app.send_task(ADD_TASK, (1, 1)).get(timeout=15) == 2  # the child is warmed up
    before = rss(child.pid)
    reset_peak_rss(child.pid)
    publish(task_queue(app), bz2_bomb, {"compression": "application/x-bz2"})

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the bomb to be dead-lettered")
    grown = peak_rss(child.pid) - before
    assert grown < GROWTH_LIMIT, f"the worker child grew by {grown / MB:.0f} MB"
    assert dead_bodies(access) == [bz2_bomb]  # as sent: under 1 KB, not inflated
    assert app.send_task(ADD_TASK, (2, 3)).get(timeout=15) == 5
    assert [c.pid for c in worker.children()] == [child.pid]
    assert len(rejected_lines(worker)) == 1


def test_bz2_bomb_on_a_client_reply_queue_is_never_decompressed(
    app: App,
    start_worker: Callable[..., WorkerProcess],
    publish: Callable[..., None],
    bz2_bomb: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nbtask.client.listener")
    start_worker(concurrency=1)
    # A first result came through the reply queue: the listener has declared it.
    assert app.send_task(ADD_TASK, (1, 1)).get(timeout=15) == 2
    me = psutil.Process().pid
    before = rss(me)
    reset_peak_rss(me)
    publish(app.channel, bz2_bomb, {"compression": "application/x-bz2"})

    wait_until(
        lambda: any("does not verify" in r.getMessage() for r in caplog.records),
        15,
        "the listener to drop the bomb",
    )
    grown = peak_rss(me) - before
    assert grown < GROWTH_LIMIT, f"the client grew by {grown / MB:.0f} MB"
    assert app.send_task(ADD_TASK, (20, 22)).get(timeout=15) == 42


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1", "utf-16"])
def test_text_encoded_body_is_dead_lettered_as_sent_and_the_log_names_the_encoding(
    encoding: str,
    app: App,
    access: RawBroker,
    start_worker: Callable[..., WorkerProcess],
    publish: Callable[..., None],
) -> None:
    # A body that decodes in its encoding: py-amqp would hand it over as text.
    body = f"forged in {encoding}: café".encode(encoding)
    worker = start_worker(concurrency=1)
    publish(task_queue(app), body, {}, encoding)

    wait_until(lambda: len(access.dead_letters()) == 1, 15, "the message to be dead-lettered")
    assert dead_bodies(access) == [body]
    lines = rejected_lines(worker)
    assert len(lines) == 1 and f"content encoding ({encoding!r})" in lines[0], lines
    assert app.send_task(ADD_TASK, (2, 2)).get(timeout=15) == 4
