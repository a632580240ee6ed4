"""A dataset directory: ``dataset.json``, ``shards/shard-NNNNNN.tar`` and ``index.parquet``.

``index.parquet`` has one row per episode and can always be rebuilt from the shards alone
(``build_index``): every column comes from the episode's final chunk header.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trajdata.config import atomic_write_bytes
from trajdata.errors import DataError
from trajdata.format.schema import SCHEMA_VERSION, Schema, get_schema
from trajdata.format.shard import WALL_CLOCK_FIELDS, ShardReader

DATASET_JSON = "dataset.json"
INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
FORMAT_NAME = "trajdata"

# Index columns in order; rows may carry more (kept after these).
INDEX_COLUMNS = [
    "id", "shard", "chunks", "steps", "status", "end_reason", "score", "return", "turns", "depth",
    "character", "seed", "seeds", "expert", "expert_version", "env", "env_version", "packages",
    "collection_date", "wall_seconds",
]
# Columns readers rely on, and the arrow types they may have.
REQUIRED_COLUMNS = {"id": (pa.types.is_string, pa.types.is_large_string),
                    "shard": (pa.types.is_string, pa.types.is_large_string),
                    "steps": (pa.types.is_integer,), "chunks": (pa.types.is_integer,)}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class Dataset:
    """Read access to a dataset directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"{self.root} is a file, not a dataset directory (give the directory holding "
                            f"{DATASET_JSON}, {SHARD_DIR}/ and {INDEX_FILE})")
        if not self.root.is_dir():
            raise DataError(f"dataset directory {self.root} does not exist")
        meta_path = self.root / DATASET_JSON
        if not meta_path.is_file():
            raise DataError(f"{self.root} is not a trajdata dataset (no {DATASET_JSON})")
        try:
            self.info = json.loads(meta_path.read_text())
        except ValueError:
            raise DataError(f"{meta_path} is not valid JSON") from None
        if not isinstance(self.info, dict) or self.info.get("format") != FORMAT_NAME:
            raise DataError(f"{meta_path}: not a trajdata dataset description")
        if self.info.get("schema_version") != SCHEMA_VERSION:
            raise DataError(
                f"{meta_path}: schema version {self.info.get('schema_version')!r} is not supported "
                f"(this trajdata reads {SCHEMA_VERSION!r})"
            )
        if not isinstance(self.info.get("schema"), str):
            raise DataError(f"{meta_path}: no schema name (corrupt dataset description)")
        self.schema: Schema = get_schema(self.info["schema"])
        self._built_index: pa.Table | None = None

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def shard_paths(self) -> list[Path]:
        return sorted(self.shard_dir.glob("shard-*.tar")) if self.shard_dir.is_dir() else []

    def index(self) -> pa.Table:
        """The episode index: ``index.parquet``, or (without one) built from the shards in memory;
        reading never writes the dataset (``build_index`` / `trajdata index` write it)."""
        path = self.root / INDEX_FILE
        if not path.is_file():
            if self._built_index is None:
                self._built_index = build_index(self.root, write=False)
            return self._built_index
        fix = f"rebuild it with `trajdata index {self.root}`"
        try:
            table = pq.read_table(path, page_checksum_verification=True)
        except (pa.ArrowException, OSError, ValueError, KeyError, IndexError) as e:
            msg = " ".join(str(e).split())[:200]
            raise DataError(f"{path}: unreadable index ({msg}); {fix}") from None
        for col, types in REQUIRED_COLUMNS.items() if table.num_rows else ():
            if col not in table.column_names or not any(t(table.schema.field(col).type) for t in types):
                raise DataError(f"{path}: no {col} column of the right type (corrupt index); {fix}")
            if table.column(col).null_count:
                raise DataError(f"{path}: column {col} has empty values (corrupt index); {fix}")
        return table

    def index_rows(self) -> list[dict]:
        rows = self.index().to_pylist()
        if len({r["id"] for r in rows}) != len(rows):
            dup = next(i for i, n in Counter(r["id"] for r in rows).items() if n > 1)
            raise DataError(f"{self.root / INDEX_FILE}: episode {dup} listed twice (corrupt index); "
                            f"rebuild it with `trajdata index {self.root}`")
        if any(r["steps"] < 0 or r["chunks"] < 0 for r in rows):
            raise DataError(f"{self.root / INDEX_FILE}: negative step or chunk count (corrupt index); "
                            f"rebuild it with `trajdata index {self.root}`")
        return rows

    def shard(self, name: str) -> ShardReader:
        return ShardReader(self.shard_dir / name)

    def episode(self, episode_id: str, fields=None) -> Iterator:
        """Chunks of one episode, in order."""
        rows = [r for r in self.index_rows() if r["id"] == episode_id]
        if not rows:
            raise DataError(f"{self.root}: no episode {episode_id!r}")
        yield from self.shard(rows[0]["shard"]).chunks(fields, episode_id=episode_id)


def rows_to_table(rows: list[dict]) -> pa.Table:
    cols = list(INDEX_COLUMNS) + sorted({k for r in rows for k in r} - set(INDEX_COLUMNS))
    norm = []
    for r in rows:
        d = {}
        for c in cols:
            v = r.get(c)
            d[c] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        norm.append(d)
    if not norm:
        return pa.table({c: pa.array([], pa.int64() if c in ("steps", "chunks") else pa.string()) for c in cols})
    return pa.Table.from_pylist(norm)


def build_index(root: str | os.PathLike, write: bool = True, progress: bool = False,
                wall_clock: list[dict] | None = None) -> pa.Table:
    """Rebuild the episode index from the shards' chunk headers (and write it atomically).

    The wall-clock columns (``WALL_CLOCK_FIELDS``), which shards do not store, come from the index
    being replaced and from ``wall_clock`` (rows of a run that just wrote episodes). An episode id
    in two shards (a copied shard) is refused, naming both."""
    root = Path(root)
    ds = Dataset(root)
    paths = ds.shard_paths()
    if progress:
        from tqdm import tqdm

        paths = tqdm(paths, desc="index", unit="shard", disable=None)
    rows = [r for p in paths for r in ShardReader(p).episode_rows()]
    where: dict[str, str] = {}
    for r in rows:
        if r["id"] in where:
            raise DataError(f"{root}: episode {r['id']} is in both {where[r['id']]} and {r['shard']} (a copied "
                            f"shard?); move one of them out of {ds.shard_dir} and rerun `trajdata index {root}`")
        where[r["id"]] = r["shard"]
    carry = {r["id"]: r for r in _old_rows(root / INDEX_FILE)}
    carry.update((r["id"], r) for r in wall_clock or ())
    for r in rows:
        old = carry.get(r["id"], {})
        for k in WALL_CLOCK_FIELDS:
            if r.get(k) is None and old.get(k) is not None:
                r[k] = old[k]
    rows.sort(key=lambda r: r["id"])
    table = rows_to_table(rows)
    if write:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
        atomic_write_bytes(root / INDEX_FILE, sink.getvalue().to_pybytes())
    return table


def _old_rows(path: Path) -> list[dict]:
    """The rows of an index about to be replaced (none if it is missing or unreadable)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError):
        return []
    cols = [c for c in ("id", *WALL_CLOCK_FIELDS) if c in table.column_names]
    return [r for r in table.select(cols).to_pylist() if isinstance(r.get("id"), str)] if "id" in cols else []


def create_or_check(root: str | os.PathLike, info: dict) -> dict:
    """Create ``dataset.json`` for a new dataset, or check an existing one describes the same collection.

    ``info`` must hold ``schema``, ``env``, ``expert`` and ``collection`` (the settings that decide
    what the shards contain: resuming with other settings would mix datasets).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / SHARD_DIR).mkdir(exist_ok=True)
    full = dict(format=FORMAT_NAME, schema_version=SCHEMA_VERSION, **info)
    path = root / DATASET_JSON
    if path.is_file():
        old = Dataset(root).info
        for key in ("schema", "expert", "collection"):
            if _canon(old.get(key)) != _canon(full.get(key)):
                raise DataError(
                    f"{root} already holds a dataset with a different {key} "
                    f"({_canon(old.get(key))} vs {_canon(full.get(key))}); use another --out"
                )
        return old
    atomic_write_bytes(path, (json.dumps(full, indent=2, sort_keys=True) + "\n").encode())
    return full


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True)


def recode(src: str | os.PathLike, out: str | os.PathLike, profile: str, progress: bool = False) -> dict:
    """Copy dataset ``src`` to ``out`` re-encoding every chunk with codec ``profile`` (same chunks,
    headers and index rows); each new chunk is decoded and checked against the original before it is
    written. Shards already in ``out`` are skipped, so an interrupted run resumes."""
    from trajdata.format import codec
    from trajdata.format.shard import ShardWriter

    if profile not in codec.PROFILES:
        raise DataError(f"codec {profile!r}: choose one of {', '.join(codec.PROFILES)}")
    ds = Dataset(src)
    info = {k: v for k, v in ds.info.items() if k not in ("format", "schema_version")}
    info["collection"] = dict(info.get("collection") or {}, codec=profile)
    create_or_check(out, info)
    dst = Dataset(out)
    paths = ds.shard_paths()
    if progress:
        from tqdm import tqdm

        paths = tqdm(paths, desc="recode", unit="shard", disable=None)
    written = skipped = steps = 0
    for path in paths:
        target = dst.shard_dir / path.name
        if target.is_file():
            skipped += 1
            continue
        with ShardWriter(target, ds.schema, profile=profile) as sw:
            for c in ShardReader(path).chunks():
                meta = {k: v for k, v in c.header.items() if k not in ("steps", "schema", "schema_version", "fields")}
                blob = codec.encode_chunk(ds.schema, c.fields, meta, profile=profile)
                header, start = codec.read_header(blob, f"{target}: {c.episode_id} chunk {c.index}")
                back = codec.decode_chunk(ds.schema, header, memoryview(blob)[start:])
                for name, a in c.fields.items():
                    if not np.array_equal(back[name], a):
                        raise DataError(f"{path.name}: episode {c.episode_id} chunk {c.index}: field {name} "
                                        f"does not survive codec {profile!r} (please report this)")
                sw.add_chunk(c.episode_id, c.index, blob)
                steps += c.steps
        written += 1
    build_index(out, wall_clock=ds.index_rows() if (ds.root / INDEX_FILE).is_file() else None)
    return {"shards_written": written, "shards_skipped": skipped, "steps": steps}
