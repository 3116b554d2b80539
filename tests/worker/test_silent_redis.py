"""Redis, or a proxy before it, takes what is sent but answers nothing (a stalled server,
a network path gone dead): a worker still stops on one SIGTERM."""

from __future__ import annotations

import signal
import subprocess

from tcp_proxy import proxying, via

from nbtask import Settings


def test_one_sigterm_stops_a_worker_whose_redis_stopped_answering(
    start_worker, settings: Settings
) -> None:
    """Each step of a stop (settling each child's tasks, moving what waits on their
    queues, unregistering) would wait for Redis's answer in vain: once one answer was
    given up on, the others fail at once, so the stop does not grow with the children."""
    with proxying(settings.broker_url or "", 6379) as proxy:
        worker = start_worker("-b", via(settings.broker_url or "", proxy.url_port), concurrency=4)
        proxy.deafen(new_ones=True)  # Redis still hears, but nothing it says comes back
        worker.process.send_signal(signal.SIGTERM)  # once: a warm stop
        try:
            worker.process.wait(30)
        except subprocess.TimeoutExpired:
            log = worker.log.read_text()
            raise AssertionError(f"one SIGTERM did not stop the worker:\n{log}") from None
        assert worker.process.returncode == 0
        log = worker.log.read_text()
        assert "did not answer within 5 s" in log, log
        assert "could not unregister from the broker" in log, log
