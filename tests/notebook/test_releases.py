"""Releasing a kept value frees its store copy too, unless another use needs the bytes.

A real IPython shell against the real brokers and worker processes, with
``keep_threshold`` and ``blob_threshold`` lowered to 1 MiB so that a 2.4 MB array is kept
(and, shipped from the kernel, travels as a blob). What is looked at is the store itself:
the test's own ``blob:`` keys, the uses noted in its ``blobref:`` keys, and the files of
a shared-memory blob directory.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import redis
from helpers import cell_task as task
from helpers import held_values, wait_until
from IPython.core.interactiveshell import InteractiveShell
from raw_broker import RawBroker
from worker_process import WorkerProcess

from nbtask import Settings
from nbtask.notebook.kept import RemoteValue
from nbtask.notebook.releases import ReleaseTask
from nbtask.notebook.session import Session
from nbtask.wire.envelope import Signer

pytestmark = pytest.mark.brokers()

MAKE_X = "import numpy as np\nx = np.arange(300_000.0)"
StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Names of 1 MiB or more are kept, and arguments of 1 MiB or more travel as blobs."""
    return settings.replace(keep_threshold=1024 * 1024, blob_threshold=1024 * 1024)


@pytest.fixture
def shell(loaded: Session) -> Session:
    """The extension loaded against the test's broker; each test starts its own workers."""
    return loaded


@pytest.fixture
def store(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.result_url or settings.broker_url or "")


def kept(ip: InteractiveShell, name: str) -> RemoteValue:
    value = ip.user_ns[name]
    assert isinstance(value, RemoteValue) and value.keeper and value.blob_sizes
    return value


def blob_keys(store: redis.Redis, settings: Settings) -> set[bytes]:
    """The test's blob chunks and their notes of uses."""
    prefix = settings.key_prefix
    return {
        *store.scan_iter(match=f"{prefix}:blob:*", count=1000),
        *store.scan_iter(match=f"{prefix}:blobref:*", count=1000),
    }


def chunks_of(value: RemoteValue, settings: Settings) -> set[bytes]:
    return {f"{settings.key_prefix}:blob:{digest}:0".encode() for digest in value.blob_sizes}


def released(store: redis.Redis, settings: Settings, value: RemoteValue) -> Callable[[], bool]:
    """Whether the store no longer notes ``value`` as a use of its blobs."""
    field = f"k:{value.keeper}".encode()
    uses = [f"{settings.key_prefix}:blobref:{digest}" for digest in value.blob_sizes]
    return lambda: all(field not in store.hkeys(key) for key in uses)


def read(ip: InteractiveShell, name: str) -> Any:
    """``name`` as a local cell reads it (the values of ended cells are delivered first)."""
    ip.run_cell(f"_read = {name}")
    return ip.user_ns.pop("_read")


def drop(ip: InteractiveShell, *names: str) -> None:
    ip.run_cell(f"del {', '.join(names)}")
    gc.collect()


def test_deleting_a_kept_value_deletes_its_store_copy(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    start_worker(concurrency=1)
    task(ip, MAKE_X)
    x = kept(ip, "x")
    assert chunks_of(x, shell.app.settings) <= blob_keys(store, shell.app.settings)
    del x
    drop(ip, "x")
    wait_until(lambda: not blob_keys(store, shell.app.settings), 20, "the store copy to go")


def test_of_two_kept_values_with_the_same_bytes_the_blob_goes_with_the_last(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    start_worker(concurrency=1)
    task(ip, MAKE_X.replace("x =", "a ="))
    task(ip, MAKE_X.replace("x =", "b ="))
    a, b = kept(ip, "a"), kept(ip, "b")
    assert a.blob_sizes == b.blob_sizes and a.keeper != b.keeper
    a_went = released(store, shell.app.settings, a)
    del a
    drop(ip, "a")
    wait_until(a_went, 20, "the release of a")
    assert chunks_of(b, shell.app.settings) <= blob_keys(store, shell.app.settings)
    assert np.array_equal(b.fetch(), np.arange(300_000.0))  # read from the store copy
    del b
    drop(ip, "b")
    wait_until(lambda: not blob_keys(store, shell.app.settings), 20, "the store copy to go")


def test_a_kept_value_whose_bytes_were_also_sent_as_an_argument_goes_with_its_release(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    start_worker(concurrency=1)
    ip.run_cell("import numpy as np\narr = np.arange(300_000.0)")
    task(ip, "x = arr.copy()")  # arr went to the worker as a blob of the same bytes
    x = kept(ip, "x")
    chunks = chunks_of(x, shell.app.settings)
    assert chunks <= blob_keys(store, shell.app.settings)
    del x
    drop(ip, "x")
    # The cell has ended, so its arguments no longer need the bytes either.
    wait_until(
        lambda: not chunks & blob_keys(store, shell.app.settings), 20, "the store copy to go"
    )


def test_a_kept_value_passed_to_a_task_by_reference_stays_until_its_ttl(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    start_worker(concurrency=1)
    task(ip, MAKE_X)
    x = kept(ip, "x")
    chunks, x_went = chunks_of(x, shell.app.settings), released(store, shell.app.settings, x)

    @shell.app.task
    def total(values: Any) -> float:
        return float(values.sum())

    # Sent later: the worker loads x after the notebook released it.
    handle = total.apply_async((x,), countdown=2)
    del x
    drop(ip, "x")
    wait_until(x_went, 20, "the release of x")
    assert handle.get(timeout=30) == float(np.arange(300_000.0).sum())
    assert chunks <= blob_keys(store, shell.app.settings)


def test_a_cell_reading_a_value_deleted_meanwhile_still_loads_it(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    worker = start_worker(concurrency=1)
    task(ip, MAKE_X)
    worker.process.kill()  # no holder: the next cell loads the store copy
    wait_until(lambda: not shell.app.workers(), 20, "the dead worker to leave the registry")
    task(ip, "total = float(x.sum())", "--out follow_up")  # waits for a worker
    drop(ip, "x")
    shell.releases.flush()  # x is referenced by the cell until it ends: nothing goes
    start_worker(concurrency=1)
    ip.user_ns["follow_up"].get(timeout=30)  # raises if x could not be loaded
    assert read(ip, "total") == float(np.arange(300_000.0).sum())
    wait_until(lambda: not blob_keys(store, shell.app.settings), 20, "the store copy to go")


def test_a_named_cell_sent_before_its_value_is_deleted_still_loads_it(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    start_worker(concurrency=1)
    task(ip, MAKE_X)
    task(ip, "total = float(x.sum())", "totals --wait")
    later = shell.app.cells["totals"].apply_async(countdown=2)
    x = kept(ip, "x")
    x_went = released(store, shell.app.settings, x)
    del x
    drop(ip, "x")  # the holder drops it from memory: the cell reads the store copy
    wait_until(x_went, 20, "the release of x")
    assert later.get(timeout=30) == {"total": float(np.arange(300_000.0).sum())}


def test_a_release_without_the_secret_frees_nothing(
    ip: InteractiveShell,
    shell: Session,
    start_worker: StartWorker,
    store: redis.Redis,
    access: RawBroker,
) -> None:
    start_worker(concurrency=1)
    task(ip, MAKE_X)
    x = kept(ip, "x")
    assert x.holder is not None
    keys = blob_keys(store, shell.app.settings)
    forged = _release_message(shell, x, Signer("not-the-secret"))
    access.inject(forged, queue=x.holder)
    wait_until(lambda: access.drained(x.holder or ""), 20, "the forgery to be taken")
    assert blob_keys(store, shell.app.settings) == keys
    assert any(held.name == "x" for held in held_values(shell.app))


def test_ending_the_session_frees_the_store_copies(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    start_worker(concurrency=1)
    task(ip, MAKE_X)
    task(ip, MAKE_X.replace("x =", "y =").replace("300_000", "310_000"))
    assert len(blob_keys(store, shell.app.settings)) == 4
    ip.run_line_magic("unload_ext", "nbtask")
    assert not blob_keys(store, shell.app.settings)


def test_a_value_whose_holder_died_still_frees_its_store_copy(
    ip: InteractiveShell, shell: Session, start_worker: StartWorker, store: redis.Redis
) -> None:
    worker = start_worker(concurrency=1)
    task(ip, MAKE_X)
    worker.process.kill()
    wait_until(lambda: not shell.app.workers(), 20, "the dead worker to leave the registry")
    drop(ip, "x")
    wait_until(lambda: not blob_keys(store, shell.app.settings), 20, "the store copy to go")


class TestOnOneHost:
    """Kernel and workers share a blob directory: blobs are files in shared memory."""

    @pytest.fixture
    def settings(self, settings: Settings, tmp_path: Path) -> Settings:
        return settings.replace(blob_dir=str(tmp_path / "blobs"))

    def test_deleting_a_kept_value_removes_its_file(
        self,
        ip: InteractiveShell,
        shell: Session,
        start_worker: StartWorker,
        store: redis.Redis,
        tmp_path: Path,
    ) -> None:
        start_worker(concurrency=1)
        task(ip, MAKE_X.replace("x =", "a ="))
        task(ip, MAKE_X.replace("x =", "b ="))
        files = tmp_path / "blobs"
        a, b = kept(ip, "a"), kept(ip, "b")
        (digest,) = a.blob_sizes
        assert [path.name for path in files.iterdir()] == [digest]
        assert not store.keys(f"{shell.app.settings.key_prefix}:blob:*")
        a_went = released(store, shell.app.settings, a)
        del a, b
        drop(ip, "a")
        wait_until(a_went, 20, "the release of a")
        assert (files / digest).exists()
        drop(ip, "b")
        wait_until(lambda: not (files / digest).exists(), 20, "the file to go")
        assert not blob_keys(store, shell.app.settings)


def _release_message(shell: Session, value: RemoteValue, signer: Signer) -> bytes:
    """A release of ``value`` for its holder, as a task message signed by ``signer``."""
    header = {
        "kind": "task",
        "id": uuid.uuid4().hex,
        "name": ReleaseTask.name,
        "prefix": shell.app.settings.key_prefix,
        "queue": value.holder,
        "client": shell.app.channel,
        "created": time.time(),
        "eta": None,
        "expires": None,
        "acks_late": False,
        "ignore_result": True,
        "module": ReleaseTask.__module__,
        "code": None,
        "code_len": 0,
    }
    body: bytes = cloudpickle.dumps((([value.key],), {}), protocol=5)
    return signer.seal(header, body)
