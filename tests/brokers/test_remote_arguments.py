"""Values passed by reference: a kept value or a finished task's handle as an argument.

Both brokers. The client sends only the reference (blob digests, a task id) inside the
signed arguments; the worker loads the value itself, so a large value never passes through
the sending process. A handle whose task has not succeeded is refused when sent, and a
reference whose data is gone fails the task with an error that names the value.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from raw_broker import RawBroker

from nbtask import App
from nbtask.errors import BlobError, ResultNotReady
from nbtask.notebook.kept import RemoteValue, keep
from nbtask.wire.blobs import Packed
from nbtask.wire.envelope import Buffer

pytestmark = pytest.mark.brokers

ARRAY_ITEMS = 6 * 1024 * 1024 // 8  # 6 MiB: over the default 4 MiB blob threshold


def _array(seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(ARRAY_ITEMS)


def _kept(app: App, name: str, value: Any) -> RemoteValue:
    """``value`` kept as blobs in ``app``'s store, as a ``%%task`` cell keeps a name."""
    return keep(name, value, Packed.of(value), app.store.put_blobs)


def _count_blob_reads(app: App, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digests this client reads from its store from now on."""
    reads: list[str] = []
    real: Callable[[str, int], Buffer] = app.store.get_blob

    def get_blob(digest: str, size: int) -> Buffer:
        reads.append(digest)
        return real(digest, size)

    monkeypatch.setattr(app.store, "get_blob", get_blob)
    return reads


def test_a_handle_as_an_argument_hands_its_result_to_the_worker_not_the_client(
    app: App, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker()
    reads = _count_blob_reads(app, monkeypatch)

    @app.task
    def make(seed: int) -> Any:
        import numpy as np

        return np.random.default_rng(seed).random(6 * 1024 * 1024 // 8)  # as _array(seed)

    @app.task
    def total(values: Any, offset: float = 0.0) -> float:
        return float(values.sum()) + offset

    @app.task
    def two() -> float:
        return 2.0

    @app.task
    def plus(previous: float, values: Any) -> float:
        return previous + float(values.sum())

    made = make.delay(0)
    concurrent.futures.wait([made], timeout=30)
    expected = float(_array(0).sum())
    assert total.delay(made).get(timeout=30) == pytest.approx(expected)
    by_keyword = total.apply_async(kwargs={"values": made, "offset": 1.0})
    assert by_keyword.get(timeout=30) == pytest.approx(expected + 1.0)
    assert total.s(made).delay().get(timeout=30) == pytest.approx(expected)
    # A later step of a chain: the reference goes from worker to worker, resolved last.
    chained = (two.s() | plus.s(made)).delay()
    assert chained.get(timeout=30) == pytest.approx(expected + 2.0)
    assert reads == [], "the client fetched a result it only passed on"


def test_a_kept_value_as_an_argument_is_loaded_by_the_worker(
    app: App, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker()
    array = _array(1)
    x = _kept(app, "x", array)
    reads = _count_blob_reads(app, monkeypatch)

    @app.task
    def describe(values: Any, more: Any) -> tuple[str, float, float]:
        return type(values).__name__, float(values.sum()), float(more["again"][0].sum())

    # Also inside containers: every reference in the arguments is loaded.
    name, first, second = describe.delay(x, {"again": [x]}).get(timeout=30)
    assert name == "ndarray" and first == second == pytest.approx(float(array.sum()))
    assert reads == [], "the client fetched a value it only passed on"


def test_a_handle_of_an_unfinished_or_failed_task_is_refused_when_sent(
    app: App, start_worker
) -> None:
    @app.task
    def total(values: Any) -> float:
        return float(sum(values))

    @app.task
    def broken() -> None:
        raise ValueError("no result")

    queued = total.delay([1, 2])  # no worker yet: still PENDING
    with pytest.raises(ResultNotReady, match=r"still PENDING.*Chain the tasks"):
        total.delay(queued)
    with pytest.raises(ResultNotReady, match="still PENDING"):
        total.s(queued).delay()  # a signature's arguments too
    start_worker()
    failed = broken.delay()
    concurrent.futures.wait([failed], timeout=30)
    with pytest.raises(ResultNotReady, match="ended FAILURE"):
        total.delay(failed)


def test_a_reference_whose_data_expired_fails_the_task_naming_the_value(
    app: App, start_worker, access: RawBroker
) -> None:
    start_worker()

    @app.task
    def make() -> list[int]:
        return [1, 2, 3]

    @app.task
    def length(values: Any) -> int:
        return len(values)

    made = make.delay()
    assert made.get(timeout=30) == [1, 2, 3]
    x = _kept(app, "x", _array(2))
    access.store.delete(*access.store.scan_iter(match=f"{app.settings.key_prefix}:blob:*"))
    with pytest.raises(BlobError, match=r"kept value 'x' \(.* bytes\), passed by reference"):
        length.delay(x).get(timeout=30)
    access.store.delete(app.store.record_key(made.id))  # as when result_ttl passes
    with pytest.raises(BlobError, match=rf"result of task .*make\[{made.id}\].*not in the store"):
        length.delay(made).get(timeout=30)


def test_a_handle_of_a_task_that_kept_no_result_fails_the_task_instead_of_passing_none(
    app: App, start_worker
) -> None:
    start_worker()

    @app.task(ignore_result=True)
    def make() -> list[int]:
        return [1, 2, 3]

    @app.task
    def length(values: Any) -> int:
        return len(values)

    made = make.delay()
    concurrent.futures.wait([made], timeout=30)
    with pytest.raises(BlobError, match=r"was not kept \(ignore_result\)"):
        length.delay(made).get(timeout=30)
