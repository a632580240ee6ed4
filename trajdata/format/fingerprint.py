"""Step fingerprints: a 64-bit hash of each step's stored fields, chained through an episode.

``step_hashes`` hashes every field of each step (schema order, each field's bytes as stored) with an
xxHash64-style compiled loop (several GB/s: it runs beside a simulator without slowing it). ``chain``
folds them into one running value per step, ``c[t] = mix(c[t-1] ^ h[t])`` from ``CHAIN_START``, so a
step's chained value depends on every step up to it: the last one is the episode's fingerprint, and a
few bits of each step's value catch the step at which a re-simulation first differs from a
recording. Not cryptographic: it guards against accidents (another simulator version, a corrupt
action), not forgery.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
CHAIN_START = 0x7472616A64617461  # "trajdata"
_LANES0 = np.array([(int(_P1) + int(_P2)) % 2**64, int(_P2), 0, -int(_P1) % 2**64, 0], np.uint64)


@njit(inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(inline="always")
def _round(acc, w):
    acc = acc + w * _P2
    return _rotl(acc, 31) * _P1


@njit(inline="always")
def _mix(h):
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


@njit(inline="always")
def _word(r, t, j):
    w = np.uint64(0)
    for b in range(8):
        w |= np.uint64(r[t, j + b]) << np.uint64(8 * b)
    return w


@njit(cache=True, nogil=True)
def _absorb(r, v):
    """Absorb each step's row of one field (``r``: (T, bytes)) into that step's lanes ``v`` (T, 5)."""
    nb = r.shape[1]
    for t in range(r.shape[0]):
        v1, v2, v3, v4 = v[t, 0], v[t, 1], v[t, 2], v[t, 3]
        j = 0
        while j + 32 <= nb:
            v1 = _round(v1, _word(r, t, j))
            v2 = _round(v2, _word(r, t, j + 8))
            v3 = _round(v3, _word(r, t, j + 16))
            v4 = _round(v4, _word(r, t, j + 24))
            j += 32
        while j + 8 <= nb:
            v1 = _round(v1, _word(r, t, j))
            j += 8
        while j < nb:
            v2 = _rotl(v2 ^ (np.uint64(r[t, j]) * _P5), 11) * _P1
            j += 1
        v[t, 0], v[t, 1], v[t, 2], v[t, 3] = v1, v2, _round(v3, np.uint64(nb)), v4
        v[t, 4] += np.uint64(nb)


@njit(cache=True, nogil=True)
def _finish(v, out):
    for t in range(out.size):
        h = _rotl(v[t, 0], 1) + _rotl(v[t, 1], 7) + _rotl(v[t, 2], 12) + _rotl(v[t, 3], 18) + v[t, 4] * _P4
        out[t] = _mix(h)


@njit(cache=True, nogil=True)
def _chain(h, c0, out):
    c = c0
    for t in range(h.size):
        c = _mix(c ^ h[t]) + _P4
        out[t] = c


def step_hashes(arrays: dict[str, np.ndarray], names) -> np.ndarray:
    """(T,) uint64: a hash of each step's values of ``names`` (each ``arrays[n]`` shaped (T, ...))."""
    T = len(arrays[names[0]]) if len(names) else 0
    v = np.empty((T, 5), np.uint64)
    v[:] = _LANES0
    for n in names:
        a = np.ascontiguousarray(arrays[n])
        if T:
            _absorb(a.reshape(T, -1).view(np.uint8), v)
    out = np.empty(T, np.uint64)
    _finish(v, out)
    return out


def chain(h: np.ndarray, start: int = CHAIN_START) -> np.ndarray:
    """(T,) uint64 running values ``c[t] = mix(c[t-1] ^ h[t])``, ``c[-1] = start``."""
    out = np.empty(len(h), np.uint64)
    _chain(np.ascontiguousarray(h, np.uint64), np.uint64(start), out)
    return out


def check_bits(c: np.ndarray, bits: int) -> np.ndarray:
    """The top ``bits`` bits of each chained value (uint8)."""
    return (c >> np.uint64(64 - bits)).astype(np.uint8)
