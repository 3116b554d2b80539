"""Named datasets for ``data.ipynb``: each worker group holds one, loaded once per process.

Start the workers from the repository's root, so ``notebooks.datademo`` imports::

    nbtask worker --data catalog=notebooks.datademo:load_catalog -c 1
    nbtask worker --data weather=notebooks.datademo:load_weather -c 1
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def load_catalog() -> pd.DataFrame:
    """A star catalog (made up, the same every time): 20,000 objects of four kinds."""
    rng = np.random.default_rng(7)
    shares = [0.6, 0.3, 0.07, 0.03]
    kinds = rng.choice(["star", "galaxy", "quasar", "nebula"], size=20_000, p=shares)
    return pd.DataFrame({"kind": kinds, "magnitude": rng.normal(15.0, 2.0, size=20_000).round(2)})


def load_weather() -> pd.Series:
    """A year of daily temperatures at one station (made up, the same every time)."""
    days = pd.date_range("2026-01-01", periods=365, freq="D")
    rng = np.random.default_rng(11)
    seasonal = 12 - 10 * np.cos(2 * np.pi * np.arange(365) / 365)
    return pd.Series((seasonal + rng.normal(0, 2, 365)).round(1), index=days, name="celsius")
