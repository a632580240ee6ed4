"""Chunk codec: a chunk of T steps -> one self-describing binary blob, and back, bit-exact.

Each field is stored as one contiguous array for the whole chunk, zstd-compressed (long window),
with a CRC32 of its compressed bytes. Fields that are (nearly) derivable from others are stored as
a residual against their prediction, which is mostly zeros and costs almost nothing:

- ``chars`` / ``colors``: XOR against the map region of ``tty_chars`` / ``tty_colors``
  (they differ only where a menu or text window covers the map);
- ``glyphs``: difference against the glyph most often seen with that (char, colour) in the chunk;
- ``specials``: XOR against the value most often seen with that glyph in the chunk.

Small per-step fields (blstats, cursor, inventory ids, scalars) are stored time-major per element
(transposed) and narrowed to the smallest integer type holding their range, which makes each
element a slowly changing series that zstd compresses well. tty fields are stored as they are, so
reading only them decodes nothing else.

Blob layout: b"TDC1" | u32 header length | header JSON (utf-8) | field payloads.
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Iterable

import numpy as np
import zstandard

from trajdata.errors import DataError
from trajdata.format.schema import Schema

MAGIC = b"TDC1"
ZSTD_LEVEL = 10
ZSTD_WINDOW_LOG = 27
TRANSPOSE_MAX_ELEMENTS = 64
LUT_SAMPLE_STEPS = 256
MAP_ROWS = slice(1, 22)
MAP_COLS = slice(0, 79)

# field -> (transform, source fields); sources are decoded first.
DERIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chars": ("xor_tty_map", ("tty_chars",)),
    "colors": ("xor_tty_map", ("tty_colors",)),
    "glyphs": ("pair_lut", ("chars", "colors")),
    "specials": ("glyph_lut", ("glyphs",)),
}

_cctx_cache: dict[int, zstandard.ZstdCompressor] = {}
_dctx = zstandard.ZstdDecompressor(max_window_size=2**ZSTD_WINDOW_LOG)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    if level not in _cctx_cache:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=ZSTD_WINDOW_LOG, enable_ldm=True, write_checksum=True
        )
        _cctx_cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return _cctx_cache[level]


def _narrow_int(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu" or a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return a.astype(t) if np.dtype(t).itemsize < a.dtype.itemsize else a
    return a


def _most_frequent_map(keys: np.ndarray, values: np.ndarray, nkeys: int) -> np.ndarray:
    """Dense table key -> most frequent value with that key, over a sample of steps (0 where unseen).

    Only a predictor: residuals keep the round trip exact, so sampling trades a little size for speed.
    """
    stride = max(1, len(keys) // LUT_SAMPLE_STEPS)
    keys = keys[::stride].ravel().astype(np.int64)
    values = values[::stride]
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


def _lut_pack(table: np.ndarray, dtype) -> np.ndarray:
    nz = np.flatnonzero(table)
    return np.stack([nz, table[nz]]).astype(np.int64) if nz.size else np.zeros((2, 0), np.int64)


def _lut_unpack(packed: np.ndarray, nkeys: int, dtype) -> np.ndarray:
    table = np.zeros(nkeys, dtype)
    table[packed[0]] = packed[1]
    return table


def _pair_key(chars: np.ndarray, colors: np.ndarray) -> np.ndarray:
    return (chars.astype(np.uint16) << 8) | colors.astype(np.uint16)


GLYPH_TABLE_SIZE = 1 << 16


def _forward(name: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Field array -> (array to store, auxiliary arrays)."""
    a = arrays[name]
    kind = DERIVATIONS.get(name, (None, ()))[0]
    if kind == "xor_tty_map":
        src = arrays["tty_" + name]
        return a ^ src[:, MAP_ROWS, MAP_COLS].view(a.dtype), {}
    if kind == "pair_lut":
        key = _pair_key(arrays["chars"], arrays["colors"])
        table = _most_frequent_map(key, a, 1 << 16)
        return (a - table[key].astype(a.dtype)), {"lut": _lut_pack(table, a.dtype)}
    if kind == "glyph_lut":
        key = arrays["glyphs"].astype(np.uint16)
        table = _most_frequent_map(key, a, GLYPH_TABLE_SIZE)
        return a ^ table[key].astype(a.dtype), {"lut": _lut_pack(table, a.dtype)}
    return a, {}


def _inverse(name: str, stored: np.ndarray, aux: dict[str, np.ndarray], done: dict[str, np.ndarray]) -> np.ndarray:
    kind = DERIVATIONS.get(name, (None, ()))[0]
    if kind == "xor_tty_map":
        return stored ^ done["tty_" + name][:, MAP_ROWS, MAP_COLS].view(stored.dtype)
    if kind == "pair_lut":
        table = _lut_unpack(aux["lut"], 1 << 16, stored.dtype)
        return stored + table[_pair_key(done["chars"], done["colors"])]
    if kind == "glyph_lut":
        table = _lut_unpack(aux["lut"], GLYPH_TABLE_SIZE, stored.dtype)
        return stored ^ table[done["glyphs"].astype(np.uint16)]
    return stored


def _applies(name: str, schema: Schema) -> bool:
    return name in DERIVATIONS and all(s in schema.names for s in DERIVATIONS[name][1])


def encode_chunk(schema: Schema, arrays: dict[str, np.ndarray], meta: dict, level: int = ZSTD_LEVEL) -> bytes:
    """Encode T steps (each ``arrays[f]`` shaped (T, *f.shape)) plus ``meta`` into one blob."""
    cctx = _compressor(level)
    steps = len(arrays[schema.fields[0].name])
    entries, blobs, offset = {}, [], 0
    for f in schema.fields:
        a = np.ascontiguousarray(arrays[f.name])
        if a.shape != (steps, *f.shape) or a.dtype != f.np_dtype:
            raise ValueError(f"field {f.name}: got {a.dtype}{a.shape}, want {f.dtype}{(steps, *f.shape)}")
        stored, aux = _forward(f.name, arrays) if _applies(f.name, schema) else (a, {})
        parts = {"": stored, **{k: v for k, v in aux.items()}}
        entry = {}
        for part, arr in parts.items():
            transposed = arr.ndim >= 2 and part == "" and int(np.prod(arr.shape[1:])) <= TRANSPOSE_MAX_ELEMENTS
            if transposed:
                arr = arr.reshape(steps, -1).T
            arr = _narrow_int(np.ascontiguousarray(arr))
            blob = cctx.compress(arr.tobytes())
            entry[part or "data"] = {
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "transposed": transposed,
                "offset": offset,
                "nbytes": len(blob),
                "crc32": zlib.crc32(blob),
            }
            blobs.append(blob)
            offset += len(blob)
        entries[f.name] = entry
    header = dict(meta, steps=steps, schema=schema.name, schema_version=schema.version, fields=entries)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(hjson)), hjson, *blobs])


def read_header(blob_prefix: bytes, where: str) -> tuple[dict, int]:
    """Parse the header; returns (header, payload start). ``where`` names the chunk in errors."""
    if len(blob_prefix) < 8 or blob_prefix[:4] != MAGIC:
        raise DataError(f"{where}: not a trajdata chunk (bad magic)")
    (n,) = struct.unpack("<I", blob_prefix[4:8])
    if len(blob_prefix) < 8 + n:
        raise DataError(f"{where}: chunk header truncated")
    try:
        return json.loads(blob_prefix[8 : 8 + n]), 8 + n
    except ValueError:
        raise DataError(f"{where}: chunk header is not valid JSON") from None


def _needed(schema: Schema, fields: Iterable[str]) -> list[str]:
    order: list[str] = []

    def visit(name: str):
        if name in order:
            return
        if _applies(name, schema):
            for src in DERIVATIONS[name][1]:
                visit(src)
        order.append(name)

    for name in fields:
        schema[name]
        visit(name)
    return order


def decode_chunk(
    schema: Schema, header: dict, payload: memoryview | bytes, fields: Iterable[str] | None = None, where: str = "chunk"
) -> dict[str, np.ndarray]:
    """Decode the requested fields (default all) of a chunk; checks CRCs of what it reads."""
    want = list(fields) if fields is not None else list(schema.names)
    steps = header["steps"]
    out: dict[str, np.ndarray] = {}
    for name in _needed(schema, want):
        f = schema[name]
        if name not in header["fields"]:
            raise DataError(f"{where}: field {name!r} missing")
        parts = {}
        for part, e in header["fields"][name].items():
            blob = payload[e["offset"] : e["offset"] + e["nbytes"]]
            if len(blob) != e["nbytes"] or zlib.crc32(blob) != e["crc32"]:
                raise DataError(f"{where}: field {name!r}: checksum mismatch (corrupt data)")
            try:
                raw = _dctx.decompress(blob)
            except zstandard.ZstdError as err:
                raise DataError(f"{where}: field {name!r}: {err}") from None
            arr = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).reshape(e["shape"])
            if e["transposed"]:
                arr = arr.T
            parts[part] = arr
        data = parts.pop("data")
        if data.dtype != f.np_dtype:
            data = data.astype(f.np_dtype)
        data = data.reshape(steps, *f.shape)
        if _applies(name, schema):
            data = _inverse(name, data, parts, out)
        out[name] = np.ascontiguousarray(data)
    return {k: out[k] for k in want}
