"""An app declaring a named dataset, for workers started with ``-A tests.sample_datasets``."""

from __future__ import annotations

from collections.abc import Iterator

from nbtask import App

app = App("sample-datasets")


@app.dataset("greeting")
def greeting() -> str:
    return "hello from a dataset"


# Loaders a careless worker operator may name with --data (not declared on the app).
def unreadable() -> list[int]:
    """Fails as a loader whose file is missing does."""
    with open("/nonexistent/nbtask/catalog.parquet", "rb") as f:
        return list(f.read())


def yielding() -> Iterator[list[int]]:
    """A generator function: refused as a loader."""
    yield [1, 2, 3]


def rows_later() -> Iterator[int]:
    """Returns a generator (a loader that is not itself a generator function)."""
    return (i for i in range(3))


async def fetched() -> list[int]:
    """An ``async def`` loader: run to its end, as an ``async def`` task is."""
    return [1, 2, 3]
