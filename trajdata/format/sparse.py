"""The ``sparse`` storage stage: each step stored as its changes against the previous step.

A field's chunk holds, per step, the (position, new value) pairs where it changed (with
``values="delta"``, integer counters store the value's change instead). A *following*
field (``follow={"from": sources, ...}``) first predicts its changes from what its sources wrote
that step: at each such position (mapped through ``rect``: source (r, c) is target
(r - r0, c - c0)) it writes ``table[key]``, the key being the source value(s) there; a per-step flag
says whether that prediction is used, and the stored pairs correct it. E.g. the map ``chars``
follow ``tty_chars`` one row down, ``glyphs`` follow (``chars``, ``colors``) through a look-up table.

Decoding is a state machine that touches only the changes and then copies its state into each
output row, so it writes straight into a loader's batch (``loaders.stream.ChunkCursor``), in
consecutive step ranges of any length, with no chunk-sized buffers: memory per reader is one row
per field. A follower reads its keys from its sources' write lists (positions and the values
written), never from their output rows, so rows can be streamed out with non-temporal stores.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from trajdata.errors import DataError
from trajdata.format import kernels

TABLES = ("identity", "topline", "lut")


def geometry(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) a field's step is addressed by: 2-D fields as is, 1-D as one row."""
    return (shape[0], int(np.prod(shape[1:]))) if len(shape) >= 2 else (1, int(np.prod(shape)))


@functools.lru_cache(maxsize=64)
def follow_map(src_shape: tuple[int, ...], shape: tuple[int, ...], rect=(0, 0)) -> np.ndarray:
    """Source position -> target position (-1 outside the target) for source (r, c) at target
    (r - r0, c - c0)."""
    hs, ws = geometry(src_shape)
    ht, wt = geometry(shape)
    r = np.arange(hs)[:, None] - rect[0]
    c = np.arange(ws)[None, :] - rect[1]
    inside = (r >= 0) & (r < ht) & (c >= 0) & (c < wt)
    qmap = np.where(inside, r * wt + c, -1).astype(np.int32).ravel()
    qmap.flags.writeable = False
    return qmap


def key_size(src_dtypes: list[np.dtype]) -> int:
    return 1 << 16 if len(src_dtypes) == 2 or src_dtypes[0].itemsize > 1 else 256


@functools.lru_cache(maxsize=64)
def fixed_table(kind: str, dtype) -> np.ndarray:
    table = np.arange(256, dtype=np.int64)
    if kind == "topline":
        table[32] = 0  # the message is zero-padded where the terminal shows blanks
    table = table.astype(dtype)
    table.flags.writeable = False
    return table


def most_frequent_map(keys: np.ndarray, values: np.ndarray, nkeys: int) -> np.ndarray:
    """Dense table key -> most frequent value with that key, over a sample of steps (0 where unseen).

    Only a predictor: residuals keep the round trip exact, so callers pass a sample of steps
    (the codec samples evenly spaced steps), trading a little size for speed.
    """
    keys = keys.ravel().astype(np.int64)
    values = values.ravel().astype(np.int64)
    vmin = int(values.min()) if values.size else 0
    span = (int(values.max()) - vmin + 1) if values.size else 1
    pair = keys * span + (values - vmin)
    uniq, counts = np.unique(pair, return_counts=True)
    ukeys, uvals = uniq // span, uniq % span + vmin
    order = np.lexsort((-counts, ukeys))
    ukeys, uvals = ukeys[order], uvals[order]
    first = np.ones(len(ukeys), bool)
    first[1:] = ukeys[1:] != ukeys[:-1]
    table = np.zeros(nkeys, np.int64)
    table[ukeys[first]] = uvals[first]
    return table


def fit_table(x: np.ndarray, keys: list[np.ndarray], sample) -> np.ndarray:
    """Most frequent value of ``x`` per source key (same geometry), over sampled steps."""
    if len(keys) == 2:
        key = (sample(keys[0]).astype(np.int64) & 255) << 8 | (sample(keys[1]).astype(np.int64) & 255)
    else:
        key = sample(keys[0]).astype(np.int64) & 65535
    return most_frequent_map(key, sample(x), key_size([k.dtype for k in keys]))


_NO_MAP = np.zeros(1, np.int32)
_NO_SOURCE = (np.zeros(2, np.int64), np.zeros(1, np.uint16), np.zeros((1, 1), np.uint8))


def encode(x: np.ndarray, follow: dict, sources: list[tuple[np.ndarray, tuple]], table: np.ndarray | None):
    """``x`` (T, *shape); ``sources``: (array (T, ...), write list) of each ``follow["from"]`` field.
    Returns (parts to store, this field's write list (offsets, positions))."""
    T = len(x)
    x2 = np.ascontiguousarray(x).reshape(T, -1)
    F = x2.shape[1]
    if F >= 1 << 16:
        raise ValueError(f"sparse stage: {F} elements per step; positions are 16-bit")
    off0, pos0, key0 = _NO_SOURCE
    srcs = [(wl[0], wl[1], np.ascontiguousarray(a).reshape(T, -1)) for a, wl in sources]
    a = srcs[0] if srcs else (off0, pos0, key0)
    b = srcs[1] if len(srcs) > 1 else (off0, pos0, key0)
    qmap = follow_map(sources[0][0].shape[1:], x.shape[1:], tuple(follow.get("rect", (0, 0)))) if srcs else _NO_MAP
    if table is None:
        table = np.zeros(1, x2.dtype)
    cap = T * F + sum(len(s[1]) for s in srcs)
    flags, counts = np.zeros(T, np.uint8), np.zeros(T, np.uint16)
    dpos, vals = np.empty(T * F, np.uint16), np.empty(T * F, x2.dtype)
    wl_off, wl_pos = np.empty(T + 1, np.int64), np.empty(cap, np.uint16)
    H, W = geometry(x.shape[1:])
    dense = int(follow.get("dense", 0)) if follow.get("values") != "delta" and H < 256 else 0
    dcounts = np.zeros(T if dense else 0, np.uint8)
    drows, dvals = np.empty(T * H if dense else 0, np.uint8), np.empty(T * F if dense else 0, x2.dtype)
    n, w, nd = kernels.sparse_encode(x2, len(srcs), a[0], a[1], b[0], b[1], a[2], b[2], len(srcs) == 2,
                                     qmap, table.astype(x2.dtype), follow.get("values") == "delta",
                                     flags, counts, dpos, vals,
                                     wl_off, wl_pos, W, dense, dcounts, drows, dvals)
    parts = {"": vals[:n].copy(), "pos": dpos[:n].copy(), "count": counts}
    if srcs:
        parts["flag"] = flags
    if dense:
        parts.update(rows=dcounts, row=drows[:nd].copy(), rowval=dvals[: nd * W].copy())
    return parts, (wl_off, wl_pos[:w])


class Field:
    """One sparse field of one chunk, decoded in step order, in ranges of any length; holds its state
    (one row) and where it is (step ``t``, patch ``k``)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype, follow: dict, parts: dict,
                 source_shape: tuple[int, ...] | None, table: np.ndarray | None, source_dtypes=(),
                 where: str = "chunk"):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        self.where = where
        self.sources = list(follow.get("from", ()))
        self.counts = parts["count"]
        self.steps = len(self.counts)
        self.dpos = parts["pos"]
        self.vals = parts["data"] if parts["data"].dtype == self.dtype else parts["data"].astype(self.dtype)
        self.flags = parts.get("flag", _NO_FLAGS)
        self.F = math.prod(self.shape)
        nb = self.F * self.dtype.itemsize
        self.state = np.zeros(nb + kernels.STATE_PAD, np.uint8)[:nb].view(self.dtype)
        self.qmap = (follow_map(tuple(source_shape), self.shape, tuple(follow.get("rect", (0, 0)))) if self.sources
                     else _NO_MAP)
        self.table = table if table is not None else np.zeros(1, self.dtype)
        self.pair = len(self.sources) == 2
        src_F = math.prod(source_shape) if self.pair else 1
        self.shadows = ([np.zeros(src_F, d) for d in source_dtypes] if self.pair
                        else [np.zeros(1, self.dtype)] * 2)
        self.add = follow.get("values") == "delta"
        n = int(self.counts.sum(dtype=np.int64))
        if n != len(self.vals) or n != len(self.dpos) or (self.sources and len(self.flags) != self.steps):
            raise DataError(f"{where}: field {name!r}: {n} changes counted, {len(self.vals)} values, {len(self.dpos)} "
                            f"positions, {len(self.flags)} flags for {self.steps} steps (corrupt data)")
        self.W = geometry(self.shape)[1]
        self.dcounts = parts.get("rows", _NO_FLAGS)
        self.drows = parts.get("row", _NO_FLAGS)
        dvals = parts.get("rowval", _NO_FLAGS)
        self.dvals = dvals if dvals.dtype == self.dtype else dvals.astype(self.dtype)
        nd = int(self.dcounts.sum(dtype=np.int64))
        if (len(self.dcounts) not in (0, self.steps) or nd != len(self.drows) or nd * self.W != len(self.dvals)):
            raise DataError(f"{where}: field {name!r}: {nd} whole rows counted, {len(self.drows)} row numbers, "
                            f"{len(self.dvals)} row values for {self.steps} steps (corrupt data)")
        self.emit = False
        self.stage = np.zeros(128, np.uint8)
        self.t = self.k = self.kd = 0

    def decode(self, m: int, out: np.ndarray | None = None, src_wls: list = (), stream: bool = False):
        """The next ``m`` steps: rows into ``out`` (m, F), C-contiguous, written with non-temporal
        stores if ``stream``, or nowhere if None. Returns those steps' write list (offsets,
        positions, values) if ``self.emit``, else None."""
        if self.t + m > self.steps:
            raise ValueError(f"{self.name}: steps {self.t}..{self.t + m} past the chunk's {self.steps}")
        if out is not None and not out.flags.c_contiguous:
            rows = np.empty(out.shape, self.dtype)
            wl = self.decode(m, rows, src_wls)
            out[...] = rows
            return wl
        a = src_wls[0] if self.sources else _NO_WL
        b = src_wls[1] if self.pair else _NO_WL
        if self.emit:
            cap = int(self.counts[self.t : self.t + m].sum(dtype=np.int64)) + sum(len(wl[1]) for wl in src_wls)
            if len(self.dcounts):
                cap += int(self.dcounts[self.t : self.t + m].sum(dtype=np.int64)) * self.W
            wl = (np.empty(m + 1, np.int64), np.empty(cap, np.uint16), np.empty(cap, self.dtype))
        else:
            wl = _NO_WL[:1] + (_NO_POS, np.zeros(0, self.dtype))
        if out is None:
            rows = kernels.ROWS_NONE
        elif stream and out.nbytes >= STREAM_MIN_ROW * m:
            rows = kernels.ROWS_STREAM
        else:
            rows = kernels.ROWS_COPY
        if out is None:
            out = np.zeros((0, self.F), self.dtype)
        k, kd, w = kernels.sparse_decode(
            self.state, m, out, rows, self.stage, self.counts, self.k, self.dpos, self.vals, self.flags, self.t,
            len(self.sources), self.pair, a[0], a[1], a[2], b[0], b[1], b[2], self.shadows[0], self.shadows[1],
            self.qmap, self.table, self.add, self.emit, *wl, self.W, self.dcounts, self.kd, self.drows, self.dvals)
        if k < 0:
            raise DataError(f"{self.where}: field {self.name!r}: step {kd}: change position past the row's {self.F} "
                            "(corrupt data)")
        self.k, self.kd = k, kd
        self.t += m
        return (wl[0], wl[1][:w], wl[2][:w]) if self.emit else None


STREAM_MIN_ROW = 64  # bytes; shorter rows are copied with ordinary stores
_NO_FLAGS = np.zeros(0, np.uint8)
_NO_POS = np.zeros(0, np.uint16)
_NO_WL = (np.zeros(2, np.int64), _NO_POS, np.zeros(0, np.uint8))
