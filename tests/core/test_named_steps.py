"""Chain steps and callbacks of an importable module travel by name, as ``delay`` does.

The worker runs its own import of the module (``-A tests.named_tasks``) for a chain's
later step and a ``link`` too: its module state, not the client's, and the one instance
of a custom task class per worker process. Tasks defined in a function travel by value.
"""

from __future__ import annotations

import pickle
import types
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from nbtask import App, Settings, Task, group
from nbtask.core.holding import holder_queue
from nbtask.core.named import module_tasks, task_named
from nbtask.core.outgoing import MessageBuilder, code_for
from nbtask.core.refs import ValueRef
from nbtask.wire.envelope import Signer, dumps
from tests import named_tasks

pytestmark = pytest.mark.brokers


def _add(app: App) -> Task:
    """A task defined like a notebook's (shipped by value), for the chains' first steps."""

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    return add


def _linked(app: App, first: Task, args: tuple[Any, ...], link: Any) -> Any:
    """The result of the task ``first(*args)`` links to, followed from the client."""
    link_id = uuid.uuid4().hex
    follow = app.expect(link_id, link.task.name)
    first.apply_async(args, link=link.set(task_id=link_id)).get(timeout=10)
    return follow.get(timeout=10)


def test_a_chain_step_and_a_link_run_the_workers_import_of_their_module(
    app: App, start_worker: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker("-A", "tests.named_tasks", concurrency=1)
    add = _add(app)
    # The client's import of the module holds other values than the worker's.
    monkeypatch.setattr(named_tasks, "SITE", "client")
    monkeypatch.setitem(named_tasks.COUNTER, "n", 100)
    assert app.send_task(named_tasks.site.name).get(timeout=10) == "imported"
    assert (add.s(1, 1) | named_tasks.site.s()).delay().get(timeout=10) == "imported"
    assert _linked(app, add, (1, 1), named_tasks.site.s()) == "imported"
    assert group([add.s(0, 0), named_tasks.site.s()]).delay().get(timeout=10) == [0, "imported"]
    # One process, one module: each call counts on from the last, whichever way it came.
    counts = [(add.s(1, 1) | named_tasks.bump.s()).delay().get(timeout=10) for _ in range(3)]
    counts.append(_linked(app, add, (1, 1), named_tasks.bump.s()))
    counts.append(app.send_task(named_tasks.bump.name).get(timeout=10))
    assert counts == [1, 2, 3, 4, 5]
    assert named_tasks.COUNTER == {"n": 100}  # nothing ran here


def test_a_step_whose_module_holds_an_unpicklable_client_can_be_chained_and_linked(
    app: App, start_worker: Callable[..., Any]
) -> None:
    start_worker("-A", "tests.named_tasks")
    add = _add(app)
    assert (add.s(1, 1) | named_tasks.locked.s("x")).delay().get(timeout=10) == [2, "x"]
    assert _linked(app, add, (2, 2), named_tasks.locked.s()) == [4]
    steps = add.si(1, 2) | named_tasks.locked.si(1) | named_tasks.locked.s(2)
    assert steps.delay().get(timeout=10) == [[1], 2]


def test_a_custom_task_class_has_one_instance_per_worker_process_across_chain_steps(
    app: App, start_worker: Callable[..., Any]
) -> None:
    start_worker("-A", "tests.named_tasks", concurrency=1)
    add = _add(app)
    pid, instance, calls = app.send_task(named_tasks.count_calls.name).get(timeout=10)
    assert calls == 1
    chained = (add.si(1, 1) | named_tasks.count_calls.si() | named_tasks.count_calls.s()).delay()
    steps = [chained.parent.get(timeout=10), chained.get(timeout=10)]
    steps.append(_linked(app, add, (1, 1), named_tasks.count_calls.s()))
    assert steps == [(pid, instance, 2), (pid, instance, 3), (pid, instance, 4)]


@pytest.mark.brokers("redis")
def test_a_task_by_name_loads_as_a_stand_in_sent_by_name_where_its_module_is_missing() -> None:
    # The process that sends a chain's next step may not have the module: the worker
    # running the step, on another queue, imports it.
    assert pickle.loads(dumps(named_tasks.site)) is named_tasks.site
    carried = {"acks_late": True, "queue": "elsewhere"}
    stand_in = task_named(
        "tests.no_such_module", "site", "tests.no_such_module.site", Task, carried
    )
    assert (stand_in.name, stand_in.acks_late, stand_in.queue) == (
        "tests.no_such_module.site",
        True,
        "elsewhere",
    )
    assert code_for(stand_in, {}) == (None, b"")  # never shipped by value
    again = pickle.loads(dumps(stand_in))
    assert (again.name, getattr(again, "_sent_module", None)) == (
        stand_in.name,
        "tests.no_such_module",
    )
    # A task defined in a function still travels by value.
    app = App("by-value", insecure=True)
    add = _add(app)
    assert pickle.loads(dumps(add)) is not add
    app.close()


class _UnconnectedApp:
    """The app of a module a worker imported: never connected in that process."""

    def workers(self) -> dict[str, Any]:
        raise AssertionError("a worker read the live workers through a module's app")

    def route(self, name: str) -> None:
        return None

    def sent_to(self, queue: str) -> bool:
        raise AssertionError("a worker read the live workers through a module's app")


@pytest.mark.brokers("redis")
def test_a_workers_chain_step_given_a_kept_value_is_not_placed_through_its_modules_app() -> None:
    # A chain's next step now is the worker's own import of the task, whose app was never
    # connected there: asking it where the value is held would connect it (and start an
    # embedded cluster in the worker process when no broker is configured).
    held = ValueRef("x", [], b"")
    held.holder = holder_queue("w1-0")
    app = App("unconnected", insecure=True)
    task = _add(app)
    task.app = _UnconnectedApp()
    builder = MessageBuilder(Signer("a secret"), Settings(), through_apps=False)
    assert builder._holder_queue(task, [held], ()) is None
    app.close()


def test_a_class_based_task_registered_on_an_app_travels_by_name(
    app: App, start_worker: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``app.register_task(Task())``, held by no name or by another than its class's."""
    start_worker("-A", "tests.named_tasks", concurrency=1)
    add = _add(app)
    monkeypatch.setattr(named_tasks, "SITE", "client")
    registered = named_tasks.app.tasks["tests.named_tasks.RegisteredSite"]
    for task in (registered, named_tasks.held_site):
        assert pickle.loads(dumps(task)) is task  # by name: this process's own instance
        assert code_for(task, {}) == (None, b"")  # sent by name, not shipped
        assert (add.s(1, 1) | task.s()).delay().get(timeout=10) == ("imported", True)
        assert _linked(app, add, (1, 1), task.s()) == ("imported", True)


def test_module_tasks_finds_the_tasks_registered_on_whatever_holds_them() -> None:
    """An app, a function or a module the module holds: each one's ``tasks`` are looked in."""
    module = types.ModuleType("nbtask_holding_tasks")
    own = type("Own", (), {"__module__": module.__name__})
    on_app, on_function, on_module = own(), own(), own()
    module.app = types.SimpleNamespace(tasks={"a": on_app})  # type: ignore[attr-defined]

    def helper() -> None:
        pass

    helper.tasks = {"f": on_function}  # type: ignore[attr-defined]
    module.helper = helper  # type: ignore[attr-defined]
    inner = types.ModuleType("inner")
    inner.tasks = {"m": on_module, "other": object()}  # type: ignore[attr-defined]
    module.inner = inner  # type: ignore[attr-defined]
    module.settings = {"tasks": {"x": own()}}  # type: ignore[attr-defined]  # plain data
    found = module_tasks(module)
    assert [v for v in found if isinstance(v, own)] == [on_app, on_function, on_module]
