"""A decoded chunk the loaders copy batch rows out of (from shards, or re-simulated from a pack)."""
from __future__ import annotations

import numpy as np


class DenseChunk:
    """A chunk decoded whole: reads copy row ranges out of it."""

    def __init__(self, dense: dict[str, np.ndarray]):
        self.dense = dense

    def read(self, out: dict, row: int, col: int, i: int, m: int, skip=()) -> None:
        for name, arr in out.items():
            if name in self.dense and name not in skip:
                arr[row, col : col + m] = self.dense[name][i : i + m]
