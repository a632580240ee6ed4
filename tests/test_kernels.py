"""The codec's compiled kernels agree with the NumPy expressions they replace, on every dtype they
serve, including wrap-around arithmetic and negative int16 keys."""
import numpy as np
import pytest

from trajdata.format import kernels

rng = np.random.default_rng(0)


def _ints(dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("stored_dt,key_dt,size", [
    (np.int8, np.uint8, 256),      # tty_colors ^ table[tty_chars]
    (np.uint8, np.int16, 1 << 16),  # specials ^ table[glyphs as uint16]
    (np.int16, np.int16, 1 << 16),
])
@pytest.mark.parametrize("op", [kernels.XOR, kernels.ADD, kernels.SUB])
def test_lut_matches_numpy(stored_dt, key_dt, size, op):
    stored, key = _ints(stored_dt, (37, 5, 3)), _ints(key_dt, (37, 5, 3))
    table = _ints(stored_dt, size)
    v = table[key.astype(np.int64) & (size - 1)]
    want = {kernels.XOR: stored ^ v, kernels.ADD: stored + v, kernels.SUB: stored - v}[op]
    got = kernels.lut(stored, key, table, op)
    assert got.dtype == stored.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op", [kernels.ADD, kernels.SUB, kernels.XOR])
def test_pair_lut_matches_numpy(op):
    stored, hi, lo = _ints(np.int16, (50, 21, 79)), _ints(np.uint8, (50, 21, 79)), _ints(np.uint8, (50, 21, 79))
    table = _ints(np.int16, 1 << 16)
    v = table[(hi.astype(np.int64) << 8) | lo]
    want = {kernels.XOR: stored ^ v, kernels.ADD: stored + v, kernels.SUB: stored - v}[op]
    np.testing.assert_array_equal(kernels.pair_lut(stored, hi, lo, table, op), want)


@pytest.mark.parametrize("dtype,shape", [(np.uint8, (33, 24, 80)), (np.int8, (33, 24, 80)), (np.uint8, (9, 7)),
                                         (np.uint8, (0, 8)), (np.uint8, (1, 5))])
def test_xor_prefix_undoes_xor_with_previous(dtype, shape):
    a = _ints(dtype, shape)
    d = a.copy()
    d[1:] ^= a[:-1]
    got = kernels.xor_prefix(d)
    np.testing.assert_array_equal(got, a)
    assert got.dtype == a.dtype and not np.shares_memory(got, d)


def test_map_or_prev_round_trip_and_picks_previous_under_an_overlay():
    T = 40
    tty = _ints(np.uint8, (T, 24, 80))
    x = np.ascontiguousarray(tty[:, 1:22, :79]).copy()
    x[10:20] = x[9]  # a text window covers the map in the terminal for steps 10..19: the map is unchanged
    x[15, 3, 4] ^= 1  # ... except one cell
    stored, use = kernels.map_or_prev_forward(x, tty, 1, 0)
    assert use.dtype == np.uint8 and use[0] == 0
    assert use[10:20].all() and not use[1:10].any() and not use[20:].any()
    assert np.count_nonzero(stored[10:20]) == 2  # the changed cell, and it changing back
    np.testing.assert_array_equal(kernels.map_or_prev_inverse(stored, tty, 1, 0, use), x)
    x8 = x.view(np.int8)
    s8, u8 = kernels.map_or_prev_forward(x8, tty.view(np.int8), 1, 0)
    assert s8.dtype == np.int8
    np.testing.assert_array_equal(kernels.map_or_prev_inverse(s8, tty.view(np.int8), 1, 0, u8), x8)
