"""An app declaring a named dataset, for workers started with ``-A tests.sample_datasets``."""

from __future__ import annotations

from nbtask import App

app = App("sample-datasets")


@app.dataset("greeting")
def greeting() -> str:
    return "hello from a dataset"
