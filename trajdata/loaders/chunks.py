"""A decoded chunk the loaders copy batch rows out of (from shards, or re-simulated from a pack)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class DenseChunk:
    """A chunk decoded whole: reads copy row ranges out of it."""

    def __init__(self, dense: dict[str, np.ndarray]):
        self.dense = dense

    def read(self, out: dict, row: int, col: int, i: int, m: int, skip=()) -> None:
        for name, arr in out.items():
            if name in self.dense and name not in skip:
                arr[row, col : col + m] = self.dense[name][i : i + m]


class ChunkCache:
    """The ``limit`` most recently used decoded chunks by key (``limit`` 0: none kept)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._chunks: OrderedDict = OrderedDict()

    def get(self, key):
        chunk = self._chunks.get(key)
        if chunk is not None:
            self._chunks.move_to_end(key)
        return chunk

    def put(self, key, chunk):
        if self.limit:
            self._chunks[key] = chunk
            while len(self._chunks) > self.limit:
                self._chunks.popitem(last=False)
        return chunk
