from __future__ import annotations

import traceback

import pytest
from helpers import AMQP_URL, free_port

from nbtask import App, BrokerUnavailable, Settings


def test_module_task_by_name_and_main_function_by_value(app: App, start_worker) -> None:
    start_worker()
    assert app.send_task("tests.sample_tasks.add", (2, 3)).get(timeout=10) == 5

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    assert mul.delay(6, 7).get(timeout=10) == 42


@pytest.mark.parametrize("wrong", ["redis port", "amqp password"])
def test_a_broker_that_cannot_be_reached_is_one_error_without_the_drivers_frames(
    settings: Settings, redis_url: str, wrong: str
) -> None:
    if wrong == "redis port":
        given = settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    else:
        wrong_login = AMQP_URL.replace("guest:guest", "guest:wrong")
        given = settings.replace(broker_url=wrong_login, result_url=redis_url)
    unreachable = App("unreachable", settings=given)
    try:

        @unreachable.task
        def add(x: int, y: int) -> int:
            return x + y

        with pytest.raises(BrokerUnavailable, match=r"cannot reach the .* broker at") as info:
            add.delay(1, 2)
        files = [frame.filename for frame in traceback.extract_tb(info.value.__traceback__)]
        # Neither nbtask's broker layer nor redis-py's or kombu's attempt: the line says it.
        assert not [f for f in files if "/brokers/" in f or "-packages/" in f], files
        assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        unreachable.close()
