"""Compiled (numba) inner loops of the codec: table look-ups and the prefix-XOR scan.

NumPy's fancy indexing widens every key to an 8-byte index and makes temporaries; these loops read
each input once and write each output once (4-6x faster, see ``bin/bench_format.py``). Compiled
on first use and cached on disk; they release the GIL, so decoding in threads scales.

``op``: 0 = XOR, 1 = add, 2 = subtract (wrapping, like NumPy's same-dtype arithmetic).
"""
from __future__ import annotations

import platform

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

XOR, ADD, SUB = 0, 1, 2


@njit(inline="always")
def _apply(s, v, op):
    if op == 0:
        return s ^ v
    if op == 1:
        return s + v
    return s - v


@njit(cache=True, nogil=True)
def _lut(stored, key, table, out, op):
    mask = table.size - 1
    for i in range(stored.size):
        out[i] = _apply(stored[i], table[np.int64(key[i]) & mask], op)


@njit(cache=True, nogil=True)
def _pair_lut(stored, hi, lo, table, out, op):
    for i in range(stored.size):
        out[i] = _apply(stored[i], table[(np.int64(hi[i]) << 8) | np.int64(lo[i])], op)


@njit(cache=True, nogil=True)
def _xor_prefix(d, out):
    if d.shape[0]:
        out[0] = d[0]
    for t in range(1, d.shape[0]):
        for j in range(d.shape[1]):
            out[t, j] = out[t - 1, j] ^ d[t, j]


@njit(cache=True, nogil=True)
def _map_or_prev_forward(x, tty, r0, c0, stored, use):
    T, H, W = x.shape
    for t in range(T):
        miss_map = 0
        miss_prev = 0
        for i in range(H):
            for j in range(W):
                v = x[t, i, j]
                if v != tty[t, r0 + i, c0 + j]:
                    miss_map += 1
                if t > 0 and v != x[t - 1, i, j]:
                    miss_prev += 1
        u = t > 0 and miss_prev < miss_map
        use[t] = u
        for i in range(H):
            for j in range(W):
                stored[t, i, j] = x[t, i, j] ^ (x[t - 1, i, j] if u else tty[t, r0 + i, c0 + j])


@njit(cache=True, nogil=True)
def _prev_fixup(stored, use, out):
    for t in range(1, stored.shape[0]):
        if use[t]:
            for k in range(stored.shape[1]):
                out[t, k] = stored[t, k] ^ out[t - 1, k]


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def map_or_prev_forward(x: np.ndarray, tty: np.ndarray, r0: int, c0: int) -> tuple[np.ndarray, np.ndarray]:
    """Residual of the map field ``x`` (T, H, W) against, per step, whichever predicts it better: the
    terminal's map region ``tty[:, r0:r0+H, c0:c0+W]``, or ``x`` at the previous step (better while a
    menu or text window covers the map). Returns (residual, use_previous flags as uint8)."""
    stored = np.empty(x.shape, np.uint8)
    use = np.zeros(len(x), np.uint8)
    _map_or_prev_forward(_u8(x), _u8(tty), r0, c0, stored, use)
    return stored.view(x.dtype), use


def map_or_prev_inverse(stored: np.ndarray, tty: np.ndarray, r0: int, c0: int, use: np.ndarray) -> np.ndarray:
    """Undo ``map_or_prev_forward``: XOR with the map everywhere (vectorised), then redo the flagged
    steps in time order from their previous step."""
    T, H, W = stored.shape
    out = _u8(stored) ^ _u8(tty)[:, r0 : r0 + H, c0 : c0 + W]
    use = np.ascontiguousarray(use, np.uint8)
    if use[1:].any():
        _prev_fixup(_u8(stored).reshape(T, H * W), use, out.reshape(T, H * W))
    return out.view(stored.dtype)


def _as(table: np.ndarray, dtype) -> np.ndarray:
    return table.view(dtype) if table.dtype.itemsize == np.dtype(dtype).itemsize else table.astype(dtype)


def lut(stored: np.ndarray, key: np.ndarray, table: np.ndarray, op: int) -> np.ndarray:
    """``stored OP table[key]`` elementwise; ``table`` has a power-of-two size, keys wrap to it
    (an int16 key indexes a 65536 table as its uint16 bit pattern)."""
    assert stored.shape == key.shape and table.size & (table.size - 1) == 0
    out = np.empty(stored.shape, stored.dtype)
    _lut(np.ascontiguousarray(stored).reshape(-1), np.ascontiguousarray(key).reshape(-1),
         _as(table, stored.dtype), out.reshape(-1), op)
    return out


def pair_lut(stored: np.ndarray, hi: np.ndarray, lo: np.ndarray, table: np.ndarray, op: int) -> np.ndarray:
    """``stored OP table[hi << 8 | lo]`` elementwise for uint8 ``hi``/``lo`` and a 65536 table."""
    assert stored.shape == hi.shape == lo.shape and table.size == 1 << 16
    assert hi.dtype == lo.dtype == np.uint8
    out = np.empty(stored.shape, stored.dtype)
    _pair_lut(np.ascontiguousarray(stored).reshape(-1), np.ascontiguousarray(hi).reshape(-1),
              np.ascontiguousarray(lo).reshape(-1), _as(table, stored.dtype), out.reshape(-1), op)
    return out


def xor_prefix(d: np.ndarray) -> np.ndarray:
    """Row t of the result is the XOR of rows 0..t of ``d`` (along axis 0): undoes XOR-with-previous."""
    d = np.ascontiguousarray(d)
    out = np.empty(d.shape, d.dtype)
    row = int(np.prod(d.shape[1:]))
    src, dst = d.reshape(len(d), row), out.reshape(len(d), row)
    if src.shape[1] % 8 == 0:
        src, dst = src.view(np.uint64), dst.view(np.uint64)
    _xor_prefix(src, dst)
    return out


# ---- sparse stage: per-step changes, optionally following another field's changes ----------------
# A step's patches are (delta-coded position, new value) pairs, ascending (with ``add``: the
# value's change, for counters). A following field first
# writes ``table[key]`` at the positions its sources wrote this step (source position q -> target
# position ``qmap[q]``, -1: none), when that step's flag is set. Every field records the
# positions it wrote per step (its "write list"), which its own followers replay. The encoder
# (keys from whole source arrays) and the decoder (keys from the write lists' values, the last
# write to a position being its final value) replay the same lists in the same order, so their
# write lists agree exactly.

@njit(inline="always")
def _key(key_a, key_b, i, q, pair):
    if pair:
        return (np.int64(key_a[i, q]) & 255) << 8 | (np.int64(key_b[i, q]) & 255)
    return np.int64(key_a[i, q]) & 65535


@njit(inline="always")
def _follow(src_off, src_pos, i, key_a, key_b, pair, qmap, table, mask, wl_pos, w, stamp, mark, pv):
    """Apply one source's write list of local step ``i``: stamp (encoder) or write ``pv`` (decoder)."""
    for k in range(src_off[i], src_off[i + 1]):
        q = src_pos[k]
        p = qmap[q]
        if p >= 0:
            pv[p] = table[_key(key_a, key_b, i, q, pair) & mask]
            stamp[p] = mark
            wl_pos[w] = p
            w += 1
    return w


@njit(cache=True, nogil=True)
def sparse_encode(x, nsrc, off_a, pos_a, off_b, pos_b, key_a, key_b, pair, qmap, table, add,
                  flags, counts, dpos, vals, wl_off, wl_pos, W, dense_min, dcounts, drows, dvals):
    """Per step: follow (optional), then the step's changes against that base, as (delta position,
    value) patches or, for a row of ``W`` elements with more than ``dense_min`` changes (0: never),
    the whole row (``drows``: its index, ``dvals``: its values). Returns (patches, writes, rows)."""
    T, F = x.shape
    mask = table.size - 1
    pv = np.zeros(F, x.dtype)
    stamp = np.zeros(F, np.int64)
    prev = np.zeros(F, x.dtype)
    n = 0
    w = 0
    nd = 0
    for t in range(T):
        wl_off[t] = w
        w0 = w
        if nsrc > 0:
            w = _follow(off_a, pos_a, t, key_a, key_b, pair, qmap, table, mask, wl_pos, w, stamp, t + 1, pv)
        if nsrc > 1:
            w = _follow(off_b, pos_b, t, key_a, key_b, pair, qmap, table, mask, wl_pos, w, stamp, t + 1, pv)
        use = False
        if w > w0:
            miss_follow = 0
            miss_prev = 0
            for j in range(F):
                y = x[t, j]
                if y != prev[j]:
                    miss_prev += 1
                if y != (pv[j] if stamp[j] == t + 1 else prev[j]):
                    miss_follow += 1
            use = miss_follow < miss_prev
        if not use:
            w = w0
        flags[t] = use
        last = 0
        c = 0
        d = 0
        for r0 in range(0, F, W):
            r1 = min(r0 + W, F)
            dense = False
            if dense_min > 0:
                miss = 0
                for j in range(r0, r1):
                    if x[t, j] != (pv[j] if use and stamp[j] == t + 1 else prev[j]):
                        miss += 1
                dense = miss > dense_min
                if dense:
                    drows[nd] = r0 // W
                    for j in range(r0, r1):
                        dvals[nd * W + j - r0] = x[t, j]
                    nd += 1
                    d += 1
            for j in range(r0, r1):
                y = x[t, j]
                base = pv[j] if use and stamp[j] == t + 1 else prev[j]
                if y != base:
                    if not dense:
                        dpos[n] = j - last
                        vals[n] = y - base if add else y
                        last = j
                        n += 1
                        c += 1
                    wl_pos[w] = j
                    w += 1
                prev[j] = y
        counts[t] = c
        if dense_min > 0:
            dcounts[t] = d
    wl_off[T] = w
    return n, w, nd


# Rows of a multi-GB batch are written once and not read back here, so the decoder can stream
# them with non-temporal stores: no read-for-ownership of each destination line, ~1.5x the
# bandwidth of ordinary stores. ``out`` is then a contiguous byte stream (a lane's steps laid end
# to end): whole 64-byte lines go out non-temporally, the partial lines at the ends with ordinary
# stores, through a 128-byte staging buffer.

@intrinsic
def _nt_store64(typingctx, dst, src):
    """64 bytes from address ``src`` (any alignment) to ``dst`` (64-byte aligned), non-temporally."""
    def codegen(context, builder, signature, args):
        vt = ir.VectorType(ir.IntType(8), 64)
        v = builder.load(builder.inttoptr(args[1], vt.as_pointer()), align=1)
        st = builder.store(v, builder.inttoptr(args[0], vt.as_pointer()), align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()
    return types.void(types.intp, types.intp), codegen


@intrinsic
def _copy64(typingctx, dst, src):
    """64 bytes from address ``src`` to ``dst``, ordinary unaligned load and store."""
    def codegen(context, builder, signature, args):
        vt = ir.VectorType(ir.IntType(8), 64)
        v = builder.load(builder.inttoptr(args[1], vt.as_pointer()), align=1)
        builder.store(v, builder.inttoptr(args[0], vt.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(types.intp, types.intp), codegen


@intrinsic
def _sfence(typingctx):
    """Orders the non-temporal stores before anything after (``sfence`` on x86)."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
ROWS_NONE, ROWS_COPY, ROWS_STREAM = 0, 1, 2
STATE_PAD = 64  # bytes readable past a decoder state's end (the staging copies read 64 at a time)


@njit(inline="always")
def _replay(off, pos, vals, i, pair, sh_a, sh_b, qmap, table, mask, state, emit, wl_pos, wl_val, w):
    """Decoder's follow step for one source's writes of local step ``i``: ``state[qmap[q]] =
    table[key]``, the key being the written value (or, for a pair follower, both sources' shadows)."""
    for j in range(off[i], off[i + 1]):
        q = pos[j]
        p = qmap[q]
        if p >= 0:
            if pair:
                v = table[((np.int64(sh_a[q]) & 255) << 8 | (np.int64(sh_b[q]) & 255)) & mask]
            else:
                v = table[np.int64(vals[j]) & 65535 & mask]
            state[p] = v
            if emit:
                wl_pos[w] = p
                wl_val[w] = v
                w += 1
    return w


@njit(inline="always")
def _put(ob, base, blk, stg, lo, hi):
    """Ordinary stores of staged bytes ``lo:hi`` of the line at ``blk``."""
    for b in range(lo, hi):
        ob[blk + b - base] = stg[b]


@njit(cache=True, nogil=True)
def sparse_decode(state, m, out, rows, stg, counts, k, dpos, vals, flags, t0, nsrc, pair,
                   off_a, pos_a, val_a, off_b, pos_b, val_b, sh_a, sh_b, qmap, table, add, emit,
                   wl_off, wl_pos, wl_val, W, dcounts, kd, drows, dvals):
    """Steps ``t0 .. t0 + m`` of the chunk from patch ``k`` and whole row ``kd`` on: updates ``state``
    (F,), writes each step's row to ``out`` (m, F) unless ``rows`` is ROWS_NONE, and, if ``emit``, the
    step's writes (positions and values) to ``wl_*``. Follow keys come from the sources' write-list
    values (a pair follower keeps shadow copies ``sh_a``/``sh_b`` of both sources). Whole rows
    (``dcounts`` per step; empty: none) are applied in position order with the patches, and write
    only the elements they change. Returns (k, kd, writes), or (-1, step, 0) at a position or row
    past the field (corrupt data)."""
    F = state.size
    dense = dcounts.size > 0
    mask = table.size - 1
    w = 0
    ob = out.reshape(-1).view(np.uint8)
    base = out.ctypes.data
    sp = state.ctypes.data
    gp = stg.ctypes.data
    rb = F * state.itemsize
    blk = base & ~63
    ns = base - blk
    skip = ns
    for i in range(m):
        t = t0 + i
        if emit:
            wl_off[i] = w
        if pair:
            for j in range(off_a[i], off_a[i + 1]):
                sh_a[pos_a[j]] = val_a[j]
            for j in range(off_b[i], off_b[i + 1]):
                sh_b[pos_b[j]] = val_b[j]
        if nsrc > 0 and flags[t]:
            w = _replay(off_a, pos_a, val_a, i, pair, sh_a, sh_b, qmap, table, mask, state, emit, wl_pos, wl_val, w)
            if pair:
                w = _replay(off_b, pos_b, val_b, i, pair, sh_a, sh_b, qmap, table, mask, state, emit, wl_pos, wl_val, w)
        k, kd, w = _own_writes(state, counts[t], k, dpos, vals, add, emit, wl_pos, wl_val, w,
                               dcounts[t] if dense else 0, kd, drows, dvals, W)
        if k < 0:
            return -1, t, 0
        if rows == 1:
            for j in range(F):
                out[i, j] = state[j]
        elif rows == 2:
            j = 0
            if ns > 0:
                _copy64(gp + ns, sp)
                j = min(64 - ns, rb)
                ns += j
                if ns == 64:
                    if skip:
                        _put(ob, base, blk, stg, skip, 64)
                        skip = 0
                    else:
                        _nt_store64(blk, gp)
                    blk += 64
                    ns = 0
            if ns == 0:
                while rb - j >= 64:
                    _nt_store64(blk, sp + j)
                    blk += 64
                    j += 64
                if j < rb:
                    _copy64(gp, sp + j)
                    ns = rb - j
    if rows == 2:
        _put(ob, base, blk, stg, skip, ns)
        _sfence()
    if emit:
        wl_off[m] = w
    return k, kd, w


@njit(inline="always")
def _own_writes(state, n, k, dpos, vals, add, emit, wl_pos, wl_val, w, nd, kd, drows, dvals, W):
    """A step's own changes: ``n`` patches from ``k`` and ``nd`` whole rows from ``kd``, in position
    order. Returns (k, kd, w), k -1 at a position or row past the field (corrupt data)."""
    F = state.size
    nxt = drows[kd] * W if nd > 0 else F
    p = 0
    for _ in range(n):
        p += dpos[k]
        while nd > 0 and p >= nxt and nxt < F:
            w = _whole_row(state, nxt, W, dvals, kd, emit, wl_pos, wl_val, w)
            kd, nd = kd + 1, nd - 1
            nxt = drows[kd] * W if nd > 0 else F
        if p >= F or (nd > 0 and nxt >= F):
            return -1, kd, w
        if add:
            state[p] = state[p] + vals[k]
        else:
            state[p] = vals[k]
        if emit:
            wl_pos[w] = p
            wl_val[w] = state[p]
            w += 1
        k += 1
    while nd > 0:
        if nxt >= F:
            return -1, kd, w
        w = _whole_row(state, nxt, W, dvals, kd, emit, wl_pos, wl_val, w)
        kd, nd = kd + 1, nd - 1
        nxt = drows[kd] * W if nd > 0 else F
    return k, kd, w


@njit(inline="always")
def _whole_row(state, r0, W, dvals, kd, emit, wl_pos, wl_val, w):
    """Row ``kd`` of ``dvals`` into ``state[r0 : r0 + W]``; emits the elements it changes (branch-free:
    every element goes to the next write-list slot, which only a change keeps). Slices, so that the
    loops vectorise."""
    row = state[r0 : r0 + W]
    new = dvals[kd * W : kd * W + W]
    if not emit:
        for c in range(W):
            row[c] = new[c]
        return w
    pos = wl_pos[w : w + W]
    val = wl_val[w : w + W]
    n = 0
    for c in range(W):
        v = new[c]
        pos[n] = r0 + c
        val[n] = v
        n += row[c] != v
        row[c] = v
    return w + n


@njit(cache=True, nogil=True)
def _stream_zero(b, zeros):
    base = b.ctypes.data
    n = b.size
    head = min(-base & 63, n)
    for i in range(head):
        b[i] = 0
    i = head
    zp = zeros.ctypes.data
    while n - i >= 64:
        _nt_store64(base + i, zp)
        i += 64
    for j in range(i, n):
        b[j] = 0
    _sfence()


_ZEROS = np.zeros(64, np.uint8)


def stream_zero(a: np.ndarray) -> None:
    """Zero a C-contiguous array with non-temporal stores (for multi-MB regions not read soon)."""
    _stream_zero(a.reshape(-1).view(np.uint8), _ZEROS)
