"""The codec's compiled kernels agree with the NumPy expressions they replace, on every dtype they
serve, including wrap-around arithmetic and negative int16 keys."""
import numpy as np
import pytest

from trajdata.errors import DataError
from trajdata.format import kernels, sparse

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


def _sparse_series(rng, T, shape, dtype, rate):
    x = np.zeros((T, *shape), dtype)
    info = np.iinfo(dtype)
    x[0] = rng.integers(info.min, info.max, shape, endpoint=True)
    for t in range(1, T):
        x[t] = x[t - 1]
        hit = rng.random(shape) < rate
        x[t][hit] = rng.integers(info.min, info.max, int(hit.sum()), endpoint=True)
    return x


@pytest.mark.parametrize("dense", [0, 3])
def test_sparse_follow_round_trip_in_any_segments(monkeypatch, dense):
    """Source, a rectangle follower (identity table, with its own changes and whole steps where the
    prediction is wrong), a pair follower through a look-up table and a wrapping counter: decoding
    in random segments gives the arrays and the write lists that encoding saw. With ``dense``, rows
    with more than that many changes are stored whole (a text window over the source)."""
    rng = np.random.default_rng(0)
    T = 300
    src = _sparse_series(rng, T, (6, 9), np.uint8, 0.05)
    src[50:60, 2:4] = rng.integers(0, 256, (10, 2, 9))  # whole rows rewritten
    src[60, 2:4] = src[49, 2:4]  # ... and restored
    rect = src[:, 1:5, 2:9].copy()
    rect[rng.random(rect.shape) < 0.01] = 7
    rect[100:120] = rect[99]  # an overlay: the source changes, the follower does not
    other = _sparse_series(rng, T, (4, 7), np.uint8, 0.02)
    table = rng.integers(-30000, 30000, 1 << 16).astype(np.int16)
    pair = table[(rect.astype(np.int64) << 8) | other]
    pair[rng.random(pair.shape) < 0.01] = -1
    counter = np.cumsum(rng.integers(0, 3, (T, 5)), axis=0).astype(np.int16) + np.int16(32000)
    over = src[:, 1:5, :].copy()  # a dense follower (not a pair's source: a pair keeps its sources' values)
    over[rng.random(over.shape) < 0.01] = 9
    over[70:75, 1] = rng.integers(0, 256, (5, 9))
    specs = {
        "src": ({"dense": dense}, [], None),
        "rect": ({"rect": (1, 2)}, ["src"], sparse.fixed_table("identity", np.uint8)),
        "over": ({"rect": (1, 0), "dense": dense}, ["src"], sparse.fixed_table("identity", np.uint8)),
        "other": ({}, [], None),
        "pair": ({}, ["rect", "other"], table),
        "counter": ({"values": "delta"}, [], None),
    }
    arrays = {"src": src, "rect": rect, "over": over, "other": other, "pair": pair, "counter": counter}
    parts, wls = {}, {}
    for name, (follow, srcs, tab) in specs.items():
        parts[name], wls[name] = sparse.encode(arrays[name], dict(follow, **({"from": srcs} if srcs else {})),
                                               [(arrays[s], wls[s]) for s in srcs], tab)
    assert parts["rect"]["flag"][100:120].sum() == 0 and parts["rect"]["flag"].sum() > 100
    if dense:
        assert set(parts["src"]["rows"][50:61]) == {2} and parts["src"]["rows"].sum() > 22
        assert set(parts["over"]["rows"][70:75]) == {1}
        assert "rows" not in parts["counter"]  # counters never: their values are changes
    else:
        assert "rows" not in parts["src"]
    assert len(parts["pair"][""]) < pair[1:].size * 0.02  # the table predicts most changes
    def fields():
        out = {name: sparse.Field(name, arrays[name].shape[1:], arrays[name].dtype,
                                  dict(follow, **({"from": srcs} if srcs else {})), dict(parts[name], data=parts[name][""]),
                                  arrays[srcs[0]].shape[1:] if srcs else None, tab, [arrays[s].dtype for s in srcs])
               for name, (follow, srcs, tab) in specs.items()}
        for f in out.values():
            f.emit = f.name in ("src", "rect", "over", "other")
        return out

    cuts = [0, *sorted(rng.choice(np.arange(1, T), 12, replace=False)), T]
    plain = fields()
    for a, b in zip(cuts, cuts[1:]):
        seg = {}
        for name, f in plain.items():
            rows = np.empty((b - a, f.F), f.dtype)
            seg[name] = f.decode(b - a, rows, [seg[s] for s in f.sources])
            np.testing.assert_array_equal(rows, arrays[name][a:b].reshape(b - a, -1), err_msg=name)
            if f.emit:
                off, pos = wls[name]
                np.testing.assert_array_equal(seg[name][1], pos[off[a]:off[b]], err_msg=name)
                last = {p: v for p, v in zip(seg[name][1][seg[name][0][-2]:], seg[name][2][seg[name][0][-2]:])}
                assert all(arrays[name][b - 1].reshape(-1)[p] == v for p, v in last.items()), name
            else:
                assert seg[name] is None
    # Streamed rows (non-temporal stores) into one contiguous buffer per field at every byte
    # alignment, as a batch lane is filled segment after segment; the bytes around stay untouched.
    monkeypatch.setattr(sparse, "STREAM_MIN_ROW", 0)
    for shift in (0, 1, 3, 8, 37):
        streamed = fields()
        for name, f in streamed.items():
            itemsize = f.dtype.itemsize
            buf = np.full(shift * itemsize + T * f.F * itemsize + 200, 0xAB, np.uint8)
            lane = buf[shift * itemsize : shift * itemsize + T * f.F * itemsize].view(f.dtype).reshape(T, f.F)
            f.buf, f.lane = buf, lane
        for a, b in zip(cuts, cuts[1:]):
            seg = {}
            for name, f in streamed.items():
                seg[name] = f.decode(b - a, f.lane[a:b], [seg[s] for s in f.sources], stream=True)
        for name, f in streamed.items():
            np.testing.assert_array_equal(f.lane, arrays[name].reshape(T, -1), err_msg=f"{name} shifted {shift}")
            head, tail = f.buf[: shift * f.dtype.itemsize], f.buf[shift * f.dtype.itemsize + f.lane.nbytes :]
            assert (head == 0xAB).all() and (tail == 0xAB).all(), name
    with pytest.raises(ValueError, match="past the chunk"):
        streamed["src"].decode(1, None)
    bad = dict(parts["src"], data=parts["src"][""])
    bad["pos"] = bad["pos"].copy()
    bad["pos"][len(bad["pos"]) // 2] = 60000  # past the row, in a chunk whose CRCs still match
    with pytest.raises(DataError, match=r"x.tdc: field 'src': step \d+: change position past"):
        sparse.Field("src", src.shape[1:], src.dtype, {}, bad, None, None, where="x.tdc").decode(T)
    with pytest.raises(DataError, match="changes counted"):
        sparse.Field("src", src.shape[1:], src.dtype, {}, dict(bad, data=bad["data"][1:]), None, None)
    if dense:
        bad = dict(parts["src"], data=parts["src"][""])
        bad["row"] = bad["row"].copy()
        bad["row"][len(bad["row"]) // 2] = 6  # a row past the field's 6
        with pytest.raises(DataError, match=r"x.tdc: field 'src': step \d+: change position past"):
            sparse.Field("src", src.shape[1:], src.dtype, {}, bad, None, None, where="x.tdc").decode(T)
        with pytest.raises(DataError, match="whole rows counted"):
            sparse.Field("src", src.shape[1:], src.dtype, {}, dict(bad, rowval=bad["rowval"][1:]), None, None)
    strided = fields()["counter"]
    cols = np.zeros((T, strided.F * 2), strided.dtype)
    strided.decode(T, cols[:, ::2], stream=True)  # not contiguous: decoded aside, then copied
    np.testing.assert_array_equal(cols[:, ::2], counter.reshape(T, -1))
    assert not cols[:, 1::2].any()

def test_stream_zero_clears_exactly_the_region():
    buf = np.full(1000, 7, np.uint8)
    for start, n in [(0, 0), (3, 1), (5, 63), (64, 64), (1, 130), (17, 900)]:
        buf[:] = 7
        kernels.stream_zero(buf[start : start + n])
        assert not buf[start : start + n].any() and (buf[:start] == 7).all() and (buf[start + n :] == 7).all()
    wide = np.full((4, 33), -5, np.int16)
    kernels.stream_zero(wide[1:3])
    assert not wide[1:3].any() and (wide[[0, 3]] == -5).all()
