"""Helpers shared by the tests: the services' addresses, waiting, kernels, cells, messages.

Fixtures live in ``conftest.py``. A worker process a test started is a ``WorkerProcess``
(``worker_process.py``), a redis-server of its own a ``PrivateRedis`` (``private_redis.py``).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from nbtask import App, RemoteError, Settings
from nbtask.wire.events import Event, EventType
from nbtask.wire.holdings import Held
from nbtask.wire.message import TaskMessage

ROOT = Path(__file__).resolve().parent.parent


def exited(pid: int) -> bool:
    """The process is gone, or a zombie (it has exited; its parent has not reaped it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # also when it exits while being looked at
        return True


def processes_mentioning(text: str) -> list[str]:
    """``pid: cmdline`` of live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if text in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py``, loaded from its file (nothing in it is run or timed).

    Putting ``benchmarks/`` on ``sys.path`` would shadow names such as ``run``.
    """
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


REDIS_URL = os.environ.get("NBTASK_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("NBTASK_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = ("redis", "amqp")
SECRET = "test-secret-" + uuid.uuid4().hex
#: A task that appends its id to a file, once per run: ledger_runs counts its runs.
RECORD_ID = "tests.sample_tasks.record_id"
#: The mime type of an output that shows an ipywidget.
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def without_colours(text: str) -> str:
    """``text`` without its ANSI colour codes: a traceback IPython shows, as plain text."""
    return _COLOURS.sub("", text)


def rendered(exc: BaseException) -> list[str]:
    """What IPython shows for ``exc`` instead of a traceback, as plain text."""
    render = getattr(exc, "_render_traceback_", None)
    assert render is not None, f"{exc!r} would show nbtask's frames"
    return [without_colours(line) for line in render()]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Touch:
    """Unpickles to ``None`` after creating ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def remote_of(exc: BaseException) -> RemoteError:
    """The worker's account of a task's error (name, message, traceback text).

    ``get()`` raises the task's own exception type, its cause the ``RemoteError`` holding
    that account; a type the client cannot load is a ``RemoteError`` itself.
    """
    found = exc if isinstance(exc, RemoteError) else exc.__cause__
    assert isinstance(found, RemoteError), f"no remote account on {exc!r}"
    return found


def wait_for_housekeeping(app: App, timeout: float = 15.0) -> None:
    """Until every live worker has been through a whole heartbeat begun from now on.

    A supervisor's heartbeat and the housekeeping after it (dead workers, lost deliveries,
    leases) run together: seeing a second heartbeat after ``now`` means the first one's
    housekeeping is done, and a task's follow-ups too (a slot stays busy until they end).
    """
    now = time.time()
    interval = app.settings.heartbeat_interval

    def beaten() -> bool:
        live = app.workers().values()
        return bool(live) and all(i.seen > now + interval and not i.busy for i in live)

    wait_until(beaten, timeout, "every worker's next heartbeat, idle")


def broker_env(settings: Settings) -> dict[str, str]:
    """The variables that point a kernel (or a shell) at the test's broker."""
    env = settings.to_env()
    env["NBTASK_BROKER"] = settings.broker_url or ""
    env["NBTASK_SECRET"] = settings.secret or ""
    return env


def kernel_env(settings: Settings) -> dict[str, str]:
    """This process's environment, pointing a kernel started with it at the test's broker."""
    return {**os.environ, **broker_env(settings)}


def execute(
    kc: Any, code: str, timeout: float = 60, **options: Any
) -> tuple[str, list[dict[str, Any]], Any]:
    """Run ``code`` through the kernel client ``kc``: its id, its iopub messages, its reply.

    ``options`` go with the request (``allow_stdin=False``, as a batch runner sends it).
    """
    msg_id = kc.execute(code, **options)
    reply = kc.get_shell_msg(timeout=timeout)
    # A kernel slow to start answers each of wait_for_ready's kernel_info requests:
    # replies to those (or to anything else) are not this request's.
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    msgs = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        msgs.append(m)
        if (
            m["parent_header"].get("msg_id") == msg_id
            and m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
        ):
            return msg_id, msgs, reply


def drain_until(kc: Any, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> list[Any]:
    """The kernel's iopub messages up to the first for which ``pred`` holds (that one too)."""
    msgs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        msgs.append(m)
        if pred(m):
            return msgs
    raise AssertionError(f"timed out; got {[m['msg_type'] for m in msgs]}")


def stream_text(msgs: list[dict[str, Any]]) -> str:
    """The text of the ``stream`` messages among a kernel's iopub messages ``msgs``."""
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def kernel_runner(client: Any) -> Callable[[str], str]:
    """Load nbtask in ``client``'s kernel; what then runs code there, giving what it printed.

    It fails on an error, with the error and the output.
    """

    def run(code: str) -> str:
        _, msgs, reply = execute(client, code)
        text = stream_text(msgs)
        assert reply["content"]["status"] == "ok", (reply["content"], text)
        return text

    run("%load_ext nbtask")
    return run


def client_env(settings: Settings) -> dict[str, str]:
    """The environment of a client process with these settings and no others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBTASK_")}
    return {**env, **settings.to_env(), "PYTHONPATH": str(ROOT)}


def amqp_reachable() -> None:
    """Fail, saying how to start it, unless RabbitMQ answers at AMQP_URL."""
    import kombu

    conn = kombu.Connection(AMQP_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ at {AMQP_URL} is not reachable ({exc}). Start it with: "
            "rabbitmq-server -detached (then wait a few seconds for port 5672)"
        )
    finally:
        conn.release()


#: Every key prefix of this test session starts so (one per process under pytest-xdist),
#: so the session's leftovers can be deleted at its end without touching another's.
SESSION_PREFIX = f"nbtest-{uuid.uuid4().hex[:6]}"


def delete_amqp_queues(prefix: str) -> None:
    """Delete the durable task queues declared under ``prefix`` (``<prefix>...:q:*``).

    Listing queues costs a ``rabbitmqctl`` run (about a second), so tests leave theirs
    (each test's prefix is its own) and the session deletes them all once at its end.
    """
    import kombu

    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    names = [n for n in out.split() if n.startswith(prefix) and ":q:" in n]
    if not names:
        return
    with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)


def ledger_runs(ledger: Path) -> collections.Counter[str]:
    """How many times each task id ran, from the file ``tests.sample_tasks.record_id`` writes."""
    return collections.Counter(ledger.read_text().split() if ledger.exists() else [])


def cell_task(ip: Any, source: str, line: str = "--wait") -> Any:
    """Run ``source`` in the IPython shell ``ip`` as a ``%%task`` cell (``--wait`` unless told)."""
    return ip.run_cell_magic("task", line, source)


def cell_run(ip: Any, code: str) -> Any:
    """Run ``code`` as a plain cell in ``ip``: the value of its last expression, if any.

    The test fails if the cell raised.
    """
    result = ip.run_cell(code)
    assert result.error_in_exec is None and result.error_before_exec is None, result
    return result.result


def interrupt_once_printed(ip: Any, text: str = "started", handle: str = "h") -> None:
    """SIGINT to this process (the Stop button) once the cell whose handle the shell ``ip``
    holds as ``handle`` (``%%task --out h``) printed ``text``."""

    def interrupt() -> None:
        printed = lambda: text in getattr(ip.user_ns.get(handle), "stdout", "")  # noqa: E731
        wait_until(printed, 60, "the cell to start")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()


def held_values(app: App) -> list[Held]:
    """The kept values the live worker processes of ``app``'s cluster announce they hold."""
    consumers = [c for info in app.workers().values() for c in info.consumers]
    return [held for found in app.store.holdings(consumers).values() for held in found.values]


def task_header(app: App, task_id: str, name: str, **changes: Any) -> dict[str, Any]:
    """A header of task ``name`` (in ``tests.sample_tasks``) as ``app`` writes it, to seal."""
    header: dict[str, Any] = {
        "kind": "task",
        "id": task_id,
        "name": name,
        "prefix": app.settings.key_prefix,
        "queue": "default",
        "client": app.channel,
        "created": time.time(),
        "eta": None,
        "expires": None,
        "acks_late": False,
        "ignore_result": False,
        "module": "tests.sample_tasks",
        "code": None,
        "code_len": 0,
    }
    header.update(changes)
    return header


def task_message(**fields: Any) -> TaskMessage:
    """A task message with plain fields (``fields`` replace them), never sent."""
    plain: dict[str, Any] = {
        "id": "t1",
        "name": "mod.f",
        "prefix": "p",
        "queue": "default",
        "client": "c",
        "created": 0.0,
        "eta": None,
        "expires": None,
        "acks_late": False,
        "ignore_result": False,
        "module": "mod",
        "code": None,
        "code_len": 0,
    }
    return TaskMessage(**{**plain, **fields})


def display_event(
    seq: int, text: str, display_id: str | None = None, update: bool = False
) -> Event:
    """A task's DISPLAY event of ``text`` (task id ``t``), under ``display_id`` if given."""
    data: dict[str, Any] = {"data": {"text/plain": text}, "metadata": {}}
    if display_id:
        data["transient"] = {"display_id": display_id}
    if update:
        data["update"] = True
    return Event(EventType.DISPLAY, "t", seq, data)


# A notebook's functools caches: a cached function and a class with a cached property and
# a cached method (``__hash__`` lets the method cache its calls).
NOTEBOOK_CACHES = """
import functools

@functools.lru_cache(maxsize=3, typed=True)
def kind(v):
    return type(v).__name__

class Model:
    def __init__(self, v):
        self.v = v
    @functools.cached_property
    def double(self):
        return self.v * 2
    @functools.lru_cache(maxsize=4)
    def plus(self, a):
        return self.v + a
    def __hash__(self):
        return hash(self.v)
"""


def notebook_namespace(source: str, **names: Any) -> dict[str, Any]:
    """The namespace of a notebook that ran ``source``, with ``names`` defined first.

    Named ``__main__``, as a notebook's is: no other process can import what it defines.
    """
    namespace: dict[str, Any] = {"__name__": "__main__", **names}
    exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
