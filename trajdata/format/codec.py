"""Chunk codec: a chunk of T steps -> one self-describing binary blob, and back, bit-exact.

Each field is stored as one contiguous array for the whole chunk, zstd-compressed (long window),
with a CRC32 of its compressed bytes. Fields that are (nearly) derivable from others are stored as
a residual against their prediction, which is mostly zeros and costs almost nothing:

- ``tty_colors``: XOR against the colour most often drawn with that character in the chunk;
- ``message``: XOR against the terminal's top line;
- ``chars`` / ``colors``: XOR against, per step, the map region of ``tty_chars`` / ``tty_colors``,
  or their own previous step while a menu or text window covers the map (a 1-byte flag per step);
- ``glyphs``: difference against the glyph most often seen with that (char, colour) in the chunk;
- ``specials``: XOR against the value most often seen with that glyph in the chunk.

Small per-step fields (blstats, cursor, inventory ids) are stored time-major per element
(transposed), as differences from the previous step, narrowed to the smallest integer type holding
their range: each element becomes a mostly-zero series. Storage stages: ``tty_chars`` and
``tty_colors`` XORed with the previous step; ``inv_strs`` keeps only the steps where it changed.

The derivations and stages used are a *profile* (``PROFILES``), recorded per field in each chunk
header, so readers decode any profile: ``stream2`` (the default: every field in the ``sparse``
stage, see ``sparse``, busy rows of the terminal stored whole; the smallest, and loaders decode it
straight into batch rows), ``stream`` (the same without whole rows), ``compact`` (all of the
above) or ``fast`` (no table look-ups or prefix scans on decode).

Blob layout: b"TDC1" | u32 header length | zstd(header JSON) | field payloads (zstd frames; a sparse
field's parts share one).
"""
from __future__ import annotations

import functools
import json
import struct
import zlib
from typing import Iterable

import numpy as np
import zstandard

from trajdata.errors import DataError
from trajdata.format import kernels, sparse
from trajdata.format.sparse import most_frequent_map
from trajdata.format.schema import Schema

MAGIC = b"TDC1"
ZSTD_LEVEL = 10
ZSTD_WINDOW_LOG = 27
TRANSPOSE_MAX_ELEMENTS = 64
LUT_SAMPLE_STEPS = 256
MAP_ROWS = slice(1, 22)
MAP_COLS = slice(0, 79)

# Derivation kind -> the fields it predicts from (decoded first).
SOURCES: dict[str, tuple[str, ...]] = {
    "char_lut": ("tty_chars",),
    "tty_topline": ("tty_chars",),
    "xor_tty_chars": ("tty_chars",),
    "xor_tty_colors": ("tty_colors",),
    "tty_or_prev_chars": ("tty_chars",),
    "tty_or_prev_colors": ("tty_colors",),
    "pair_lut": ("chars", "colors"),
    "glyph_lut": ("glyphs",),
}

# A profile picks, per field, a derivation and a storage stage: XOR with the previous step (frames
# that change a little each step) or dedup (keep only steps that differ from the previous one).
# "compact" is smallest; "fast" skips the table look-ups and prefix-XOR scans that cost decode time.
PROFILES: dict[str, dict] = {
    "compact": {
        "derive": {"tty_colors": "char_lut", "message": "tty_topline", "chars": "tty_or_prev_chars",
                   "colors": "tty_or_prev_colors", "glyphs": "pair_lut", "specials": "glyph_lut"},
        "xor_previous": ("tty_chars", "tty_colors"),
        "dedup": ("inv_strs",),
    },
    "fast": {
        "derive": {"message": "tty_topline", "chars": "tty_or_prev_chars", "colors": "tty_or_prev_colors"},
        "xor_previous": (),
        "dedup": ("inv_strs",),
    },
    "stream": {
        "derive": {},
        "xor_previous": (),
        "dedup": (),
        "sparse": {
            "tty_chars": {},
            "tty_colors": {"from": ("tty_chars",), "table": "lut"},
            "chars": {"from": ("tty_chars",), "rect": (1, 0), "table": "identity"},
            "colors": {"from": ("tty_colors",), "rect": (1, 0), "table": "identity"},
            "glyphs": {"from": ("chars", "colors"), "table": "lut"},
            "specials": {"from": ("glyphs",), "table": "lut"},
            "message": {"from": ("tty_chars",), "table": "topline"},
            **{name: {} for name in ("inv_glyphs", "inv_letters", "inv_oclasses", "inv_strs", "action", "reward",
                                     "done", "keypress", "lives")},
            **{name: {"values": "delta"} for name in ("tty_cursor", "blstats", "misc", "timestamp", "score")},
        },
    },
}
# "stream2": "stream" plus whole rows: a row of the terminal or of the inventory strings with more than
# ``DENSE_ROWS[field]`` changes in a step is stored whole. The bytes of a text window or menu then no
# longer depend on what it covers, so its next showing repeats them and zstd finds the repeat.
DENSE_ROWS = {"tty_chars": 5, "inv_strs": 5}
PROFILES["stream2"] = {
    "derive": {}, "xor_previous": (), "dedup": (),
    "sparse": {name: dict(spec, **({"dense": DENSE_ROWS[name]} if name in DENSE_ROWS else {}))
               for name, spec in PROFILES["stream"]["sparse"].items()},
}
DEFAULT_PROFILE = "stream2"
PROFILE_HELP = ("Storage profile: stream2 (smallest; the loader decodes it straight into batches), stream (its "
                "predecessor), compact or fast (older profiles; all stay readable).")

_cctx_cache: dict[int, zstandard.ZstdCompressor] = {}
_dctx = zstandard.ZstdDecompressor(max_window_size=2**ZSTD_WINDOW_LOG)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    if level not in _cctx_cache:
        # Long-distance matching off: on residual arrays it made chunks ~1% larger and encoding 2x slower.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=ZSTD_WINDOW_LOG, enable_ldm=False, write_checksum=True
        )
        _cctx_cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return _cctx_cache[level]


def _narrow_int(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu" or a.size == 0 or a.dtype.itemsize == 1:
        return a
    lo, hi = int(a.min()), int(a.max())
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return a.astype(t) if np.dtype(t).itemsize < a.dtype.itemsize else a
    return a


def _sample(a: np.ndarray) -> np.ndarray:
    return a[:: max(1, len(a) // LUT_SAMPLE_STEPS)]


def _lut_pack(table: np.ndarray) -> np.ndarray:
    nz = np.flatnonzero(table)
    return np.stack([nz, table[nz]]).astype(np.int64) if nz.size else np.zeros((2, 0), np.int64)


def _lut_unpack(packed: np.ndarray, nkeys: int, dtype) -> np.ndarray:
    table = np.zeros(nkeys, dtype)
    table[packed[0]] = packed[1]
    return table


def _pair_key(chars: np.ndarray, colors: np.ndarray) -> np.ndarray:
    return (chars.astype(np.uint16) << 8) | colors.astype(np.uint16)


GLYPH_TABLE_SIZE = 1 << 16


def _topline_prediction(tty_chars: np.ndarray) -> np.ndarray:
    """The message as the terminal's top line shows it: the row, zeroed after its last non-space."""
    row = tty_chars[:, 0, :]
    nonspace = row != 32
    end = row.shape[1] - np.argmax(nonspace[:, ::-1], axis=1)
    end[~nonspace.any(axis=1)] = 0
    pred = np.zeros((len(row), 256), np.uint8)
    pred[:, : row.shape[1]] = np.where(np.arange(row.shape[1])[None, :] < end[:, None], row, 0)
    return pred


def _xor_previous(a: np.ndarray) -> np.ndarray:
    d = a.copy()
    d[1:] ^= a[:-1]
    return d


def _forward(name: str, kind: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Field array -> (array to store, auxiliary arrays)."""
    a = arrays[name]
    if kind.startswith("xor_tty_"):
        src = arrays[SOURCES[kind][0]]
        return a ^ src[:, MAP_ROWS, MAP_COLS].view(a.dtype), {}
    if kind.startswith("tty_or_prev_"):
        stored, use = kernels.map_or_prev_forward(a, arrays[SOURCES[kind][0]], MAP_ROWS.start, MAP_COLS.start)
        return stored, {"prev": use}
    if kind == "char_lut":
        key = arrays["tty_chars"]
        table = most_frequent_map(_sample(key), _sample(a).view(np.uint8), 256)
        return kernels.lut(a, key, table.astype(np.uint8), kernels.XOR), {"lut": _lut_pack(table)}
    if kind == "tty_topline":
        return a ^ _topline_prediction(arrays["tty_chars"]), {}
    if kind == "pair_lut":
        chars, colors = arrays["chars"], arrays["colors"]
        table = most_frequent_map(_pair_key(_sample(chars), _sample(colors)), _sample(a), 1 << 16)
        return kernels.pair_lut(a, chars, colors, table, kernels.SUB), {"lut": _lut_pack(table)}
    if kind == "glyph_lut":
        key = arrays["glyphs"]
        table = most_frequent_map(_sample(key).astype(np.uint16), _sample(a), GLYPH_TABLE_SIZE)
        return kernels.lut(a, key, table, kernels.XOR), {"lut": _lut_pack(table)}
    return a, {}


def _inverse(kind: str, stored: np.ndarray, aux: dict[str, np.ndarray], done: dict[str, np.ndarray]) -> np.ndarray:
    if kind.startswith("xor_tty_"):
        return stored ^ done[SOURCES[kind][0]][:, MAP_ROWS, MAP_COLS].view(stored.dtype)
    if kind.startswith("tty_or_prev_"):
        return kernels.map_or_prev_inverse(stored, done[SOURCES[kind][0]], MAP_ROWS.start, MAP_COLS.start, aux["prev"])
    if kind == "char_lut":
        table = _lut_unpack(aux["lut"], 256, np.uint8)
        return kernels.lut(stored, done["tty_chars"], table, kernels.XOR)
    if kind == "tty_topline":
        return stored ^ _topline_prediction(done["tty_chars"])
    if kind == "pair_lut":
        table = _lut_unpack(aux["lut"], 1 << 16, stored.dtype)
        return kernels.pair_lut(stored, done["chars"], done["colors"], table, kernels.ADD)
    if kind == "glyph_lut":
        table = _lut_unpack(aux["lut"], GLYPH_TABLE_SIZE, stored.dtype)
        return kernels.lut(stored, done["glyphs"], table, kernels.XOR)
    raise DataError(f"unknown derivation {kind!r} (written by a newer trajdata?)")


def _sparse_specs(schema: Schema, prof: dict) -> dict[str, dict]:
    """The profile's sparse fields present in ``schema`` (a follower whose sources are missing
    stores its own changes only), in dependency order."""
    specs = {}
    for name, follow in prof.get("sparse", {}).items():
        if name in schema.names:
            ok = all(src in schema.names for src in follow.get("from", ()))
            specs[name] = dict(follow) if ok else {}
    for follow in list(specs.values()):
        if len(follow.get("from", ())) == 2:  # a pair follower keeps copies of its sources: every change counts
            for src in follow["from"]:
                specs[src].pop("dense", None)
    order: list[str] = []

    def visit(name):
        if name not in order:
            for src in specs[name].get("from", ()):
                visit(src)
            order.append(name)

    for name in specs:
        visit(name)
    return {n: specs[n] for n in order}


def _sparse_forward(schema: Schema, prof: dict, arrays: dict[str, np.ndarray]) -> dict[str, tuple[dict, dict]]:
    """field -> (parts to store, header ``follow`` entry) for the profile's sparse fields."""
    out, wls = {}, {}
    for name, follow in _sparse_specs(schema, prof).items():
        srcs = list(follow.get("from", ()))
        kind = follow.get("table")
        x = arrays[name]
        table = None
        if kind == "lut":
            table = sparse.fit_table(x, [arrays[s] for s in srcs], _sample)
        elif kind:
            table = sparse.fixed_table(kind, x.dtype)
        parts, wls[name] = sparse.encode(x, follow, [(arrays[s], wls[s]) for s in srcs], table)
        if kind == "lut":
            parts["lut"] = _lut_pack(table)
        entry = {"from": srcs, "rect": list(follow.get("rect", (0, 0))), "table": kind} if srcs else {}
        if follow.get("values"):
            entry["values"] = follow["values"]
        out[name] = (parts, entry)
    return out


def encode_chunk(schema: Schema, arrays: dict[str, np.ndarray], meta: dict, level: int = ZSTD_LEVEL,
                 profile: str = DEFAULT_PROFILE) -> bytes:
    """Encode T steps (each ``arrays[f]`` shaped (T, *f.shape)) plus ``meta`` into one blob."""
    cctx = _compressor(level)
    prof = PROFILES[profile]
    steps = len(arrays[schema.fields[0].name])
    for f in schema.fields:
        a = arrays[f.name]
        if a.shape != (steps, *f.shape) or a.dtype != f.np_dtype:
            raise ValueError(f"field {f.name}: got {a.dtype}{a.shape}, want {f.dtype}{(steps, *f.shape)}")
    if steps == 0:  # an episode that ended before its first step: every field an empty raw array
        return _encode_empty(schema, meta, cctx)
    sparse_parts = _sparse_forward(schema, prof, arrays)
    entries, blobs, offset = {}, [], 0
    for f in schema.fields:
        a = np.ascontiguousarray(arrays[f.name])
        kind = prof["derive"].get(f.name)
        if kind and not all(src in schema.names for src in SOURCES[kind]):
            kind = None
        stored, aux = _forward(f.name, kind, arrays) if kind else (a, {})
        stage = None
        follow = None
        if f.name in sparse_parts:
            (aux, follow), stage = sparse_parts[f.name], "sparse"
            stored = aux.pop("")
        elif f.name in prof["xor_previous"]:
            stored, stage = _xor_previous(stored), "xor_previous"
        elif f.name in prof["dedup"] and steps:
            changed = np.ones(steps, bool)
            changed[1:] = (stored[1:] != stored[:-1]).reshape(steps - 1, -1).any(axis=1)
            stored, stage, aux = stored[changed], "dedup", dict(aux, changed=changed)
        parts = {"": stored, **{k: v for k, v in aux.items()}}
        entry, raws = {}, []
        for part, arr in parts.items():
            transposed = arr.ndim >= 2 and part == "" and int(np.prod(arr.shape[1:])) <= TRANSPOSE_MAX_ELEMENTS
            delta = transposed and arr.dtype.kind in "iu"
            if transposed:
                arr = np.ascontiguousarray(arr.reshape(len(arr), -1).T)
            if delta and steps > 1:
                arr = arr.copy()
                arr[:, 1:] -= arr[:, :-1].copy()
            arr = _narrow_int(np.ascontiguousarray(arr))
            e = {"dtype": arr.dtype.str}
            if arr.ndim != 1:
                e["shape"] = list(arr.shape)
            if transposed:
                e["transposed"] = True
            if delta:
                e["delta"] = True
            if part == "" and stage:
                e["stage"] = stage
            if part == "" and kind:
                e["derive"] = kind
            if part == "" and follow:
                e["follow"] = follow
            entry[part or "data"] = e
            raws.append(arr.reshape(-1).view(np.uint8))
        if stage == "sparse":  # one frame for all the field's parts: fewer, larger frames decode faster
            at, padded = 0, []
            for e, raw in zip(entry.values(), raws):
                e["at"] = [at, at + len(raw)]
                pad = -len(raw) % 8  # parts start 8-byte aligned
                padded += [raw, np.zeros(pad, np.uint8)]
                at += len(raw) + pad
            raws = [np.concatenate(padded)]
            frames = [entry["data"]]
            entry["data"]["packed"] = True
        else:
            frames = list(entry.values())
        for e, raw in zip(frames, raws):
            blob = cctx.compress(raw)
            e.update(offset=offset, nbytes=len(blob), crc32=zlib.crc32(blob))
            blobs.append(blob)
            offset += len(blob)
        entries[f.name] = entry
    header = dict(meta, steps=steps, schema=schema.name, schema_version=schema.version, fields=entries)
    hjson = cctx.compress(json.dumps(header, separators=(",", ":")).encode())
    return b"".join([MAGIC, struct.pack("<I", len(hjson)), hjson, *blobs])


def _encode_empty(schema: Schema, meta: dict, cctx) -> bytes:
    """A zero-step chunk (whatever the profile): each field one empty frame, no derivation or stage."""
    entries, blobs, offset = {}, [], 0
    for f in schema.fields:
        blob = cctx.compress(b"")
        entries[f.name] = {"data": {"dtype": f.np_dtype.str, "shape": [0, *f.shape], "offset": offset,
                                    "nbytes": len(blob), "crc32": zlib.crc32(blob)}}
        blobs.append(blob)
        offset += len(blob)
    header = dict(meta, steps=0, schema=schema.name, schema_version=schema.version, fields=entries)
    hjson = cctx.compress(json.dumps(header, separators=(",", ":")).encode())
    return b"".join([MAGIC, struct.pack("<I", len(hjson)), hjson, *blobs])


def read_header(blob_prefix: bytes, where: str) -> tuple[dict, int]:
    """Parse the header; returns (header, payload start). ``where`` names the chunk in errors."""
    if len(blob_prefix) < 8 or blob_prefix[:4] != MAGIC:
        raise DataError(f"{where}: not a trajdata chunk (bad magic)")
    (n,) = struct.unpack("<I", blob_prefix[4:8])
    if len(blob_prefix) < 8 + n:
        raise DataError(f"{where}: chunk header truncated")
    try:
        return json.loads(_dctx.decompress(blob_prefix[8 : 8 + n])), 8 + n
    except (ValueError, zstandard.ZstdError):
        raise DataError(f"{where}: chunk header is not valid JSON") from None


def decode_order(schema: Schema, header: dict, fields: Iterable[str], where: str) -> list[str]:
    """``fields`` and the fields they are derived from or follow, sources first (the order to decode them)."""
    order: list[str] = []

    def visit(name: str):
        if name in order:
            return
        if name not in header["fields"]:
            raise DataError(f"{where}: field {name!r} missing")
        e = header["fields"][name]["data"]
        kind = e.get("derive")
        for src in list(SOURCES.get(kind, ()) if kind else ()) + list(e.get("follow", {}).get("from", ())):
            visit(src)
        order.append(name)

    for name in fields:
        schema[name]
        visit(name)
    return order


def follow_sources(header: dict, names: Iterable[str]) -> set[str]:
    """The fields among ``names`` that others follow (whose decoders must emit write lists)."""
    return {s for n in names for s in header["fields"][n]["data"].get("follow", {}).get("from", ())}


def read_parts(schema: Schema, header: dict, payload, name: str, where: str) -> dict[str, np.ndarray]:
    """Decompress (checking CRCs) the stored parts of one field: ``data`` plus any auxiliaries (in
    their own frames, or ``packed`` into the data's frame at byte extents ``at``)."""
    f = schema[name]
    entry = header["fields"][name]
    parts = {}
    packed = _frame(payload, entry["data"], name, where) if entry["data"].get("packed") else None
    for part, e in entry.items():
        dtype = _dtype(e["dtype"])
        if packed is not None:
            a, b = e["at"]
            if not 0 <= a <= b <= len(packed) or (b - a) % dtype.itemsize:
                raise DataError(f"{where}: field {name!r}: part {part!r} outside its frame (corrupt header)")
            arr = np.frombuffer(packed, dtype, (b - a) // dtype.itemsize, a)
        else:
            arr = np.frombuffer(_frame(payload, e, name, where), dtype)
        if "shape" in e:
            arr = arr.reshape(e["shape"])
        if e.get("delta"):
            arr = np.cumsum(arr, axis=1, dtype=f.np_dtype)
        if e.get("transposed"):
            arr = arr.T
        parts[part] = arr
    return parts


def _frame(payload, e: dict, name: str, where: str) -> bytes:
    blob = payload[e["offset"] : e["offset"] + e["nbytes"]]
    if len(blob) != e["nbytes"] or zlib.crc32(blob) != e["crc32"]:
        raise DataError(f"{where}: field {name!r}: checksum mismatch (corrupt data)")
    try:
        return _dctx.decompress(blob)
    except zstandard.ZstdError as err:
        raise DataError(f"{where}: field {name!r}: {err}") from None


_dtype = functools.lru_cache(maxsize=None)(np.dtype)


def sparse_field(schema: Schema, header: dict, name: str, parts: dict[str, np.ndarray],
                 where: str = "chunk") -> sparse.Field:
    """A sparse-stage field of a chunk, from its stored parts (``read_parts``)."""
    f = schema[name]
    follow = header["fields"][name]["data"].get("follow", {})
    srcs = follow.get("from", ())
    kind = follow.get("table")
    if kind == "lut":
        keys = [schema[s].np_dtype for s in srcs]
        table = _lut_unpack(parts["lut"], sparse.key_size(keys), f.np_dtype)
    elif kind in sparse.TABLES:
        table = sparse.fixed_table(kind, f.np_dtype)
    elif kind is not None:
        raise DataError(f"field {name!r}: unknown follow table {kind!r} (written by a newer trajdata?)")
    else:
        table = None
    return sparse.Field(name, f.shape, f.np_dtype, follow, parts, schema[srcs[0]].shape if srcs else None, table,
                        [schema[s].np_dtype for s in srcs], where)


def decode_chunk(
    schema: Schema, header: dict, payload: memoryview | bytes, fields: Iterable[str] | None = None, where: str = "chunk"
) -> dict[str, np.ndarray]:
    """Decode the requested fields (default all) of a chunk; checks CRCs of what it reads."""
    want = list(fields) if fields is not None else list(schema.names)
    steps = header["steps"]
    out: dict[str, np.ndarray] = {}
    wls: dict[str, tuple] = {}
    needed = decode_order(schema, header, want, where)
    sources = follow_sources(header, needed)
    for name in needed:
        f = schema[name]
        parts = read_parts(schema, header, payload, name, where)
        stage = header["fields"][name]["data"].get("stage")
        if stage == "sparse":
            field = sparse_field(schema, header, name, parts, where)
            field.emit = name in sources
            data = np.empty((steps, field.F), f.np_dtype)
            wls[name] = field.decode(steps, data, [wls[s] for s in field.sources])
            out[name] = data.reshape(steps, *f.shape)
            continue
        data = parts.pop("data")
        if data.dtype != f.np_dtype:
            data = data.astype(f.np_dtype)
        if stage == "dedup":
            data = data.reshape(-1, *f.shape)[np.cumsum(parts.pop("changed")) - 1]
        data = data.reshape(steps, *f.shape)
        if stage == "xor_previous":
            data = kernels.xor_prefix(data)
        kind = header["fields"][name]["data"].get("derive")
        if kind:
            data = _inverse(kind, data, parts, out)
        out[name] = np.ascontiguousarray(data)
    return {k: out[k] for k in want}
