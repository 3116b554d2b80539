"""Redis, or a proxy before it, takes what is sent but answers nothing (a stalled server,
a network path gone dead): a worker says so, keeps its time limits, and still stops on
one SIGTERM."""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil
import pytest
from helpers import wait_until
from raw_broker import RawBroker
from tcp_proxy import proxying, via

from nbtask import App, Settings
from nbtask.errors import BrokerUnavailable
from nbtask.worker.supervisor import Worker
from tests.celery_tasks import read_records


def test_one_sigterm_stops_a_worker_whose_redis_stopped_answering(
    start_worker, settings: Settings
) -> None:
    """Each step of a stop (settling each child's tasks, moving what waits on their
    queues, unregistering) would wait for Redis's answer in vain: once one answer was
    given up on, the others fail at once, so the stop does not grow with the children."""
    with proxying(settings.broker_url or "", 6379) as proxy:
        worker = start_worker("-b", via(settings.broker_url or "", proxy.url_port), concurrency=4)
        proxy.deafen(new_ones=True)  # Redis still hears, but nothing it says comes back
        log = worker.stops_on_one_sigterm()
        assert "did not answer within 5 s" in log, log
        assert "could not unregister from the broker" in log, log


def test_a_worker_whose_redis_stopped_answering_says_so_and_keeps_its_time_limits(
    start_worker, settings: Settings, tmp_path: Path
) -> None:
    """Each of its commands gives up after 5 s: the supervisor's loop goes on between
    them, logging what it sees, and kills a child past its task's hard time limit."""
    ledger = tmp_path / "ledger"
    with proxying(settings.broker_url or "", 6379) as proxy:
        url = via(settings.broker_url or "", proxy.url_port)
        worker = start_worker("-b", url, concurrency=1)
        client = App("silent", settings=settings.replace(broker_url=url))

        @client.task(time_limit=3)
        def stuck(path: str) -> None:
            import time as t

            from tests.celery_tasks import record

            record(path, h="started")
            while True:  # ignores everything but SIGKILL
                with contextlib.suppress(BaseException):
                    t.sleep(30)

        stuck.delay(str(ledger))
        client.flush()
        wait_until(lambda: bool(read_records(ledger)), 15, "the task to start")
        pid = read_records(ledger)[0]["pid"]
        proxy.deafen(new_ones=True)
        wait_until(
            lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
            60,
            "the child past its time limit to be killed",
        )
        wait_until(
            lambda: "takes connections but did not answer" in worker.log.read_text(),
            30,
            "the supervisor to say Redis does not answer",
        )
        assert "passed its hard time limit" in worker.log.read_text()
        assert worker.process.poll() is None
    client.close()


def test_a_stopping_worker_heartbeats_as_soon_as_redis_answers_again(
    settings: Settings, access: RawBroker
) -> None:
    """Stopping, once the worker gave up on an answer its other steps fail at once for 5 s
    (the stop costs a wait or two, not one per step); its heartbeat has a bounded wait of
    its own, tried all the same: a Redis back from a blip hears it at once, and other
    workers do not see this one's heartbeats stop for those 5 s more."""
    with proxying(settings.broker_url or "", 6379) as proxy:
        url = via(settings.broker_url or "", proxy.url_port)
        worker = Worker(settings, url, settings.secret, queues=["default"], concurrency=1)
        worker.connect()
        try:
            worker._answer_soon()  # as at the first SIGTERM
            proxy.deafen(new_ones=True)  # a blip: Redis hears, but says nothing back
            with pytest.raises(BrokerUnavailable, match="did not answer within 5 s"):
                worker._housekeeping(beat=True, beats=0)
            proxy.hear()
            proxy.cut()  # Redis answers again, on new connections
            assert worker.worker_id not in access.keys.workers()
            with contextlib.suppress(BrokerUnavailable):  # other steps may still fail at once
                worker._housekeeping(beat=True, beats=0)
            assert worker.worker_id in access.keys.workers()
        finally:
            worker._stopping.close()
            worker.transport.close()
