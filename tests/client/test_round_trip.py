from __future__ import annotations

from nbtask import App


def test_module_task_by_name_and_main_function_by_value(app: App, start_worker) -> None:
    start_worker()
    assert app.send_task("tests.sample_tasks.add", (2, 3)).get(timeout=10) == 5

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    assert mul.delay(6, 7).get(timeout=10) == 42
