"""An App given its broker as a keyword argument, for ``nbtask worker -A`` without ``-b``."""

from __future__ import annotations

import os

from nbtask import App

app = App("broker_app", broker=os.environ["NBTASK_TEST_APP_BROKER"])


@app.task
def add(x: int, y: int) -> int:
    return x + y
