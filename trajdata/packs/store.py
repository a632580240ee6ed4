"""The pack layout: ``P/pack.json``, ``P/shards/shard-NNNNNN.tdp`` (one per shard of the source dataset)
and ``P/index.jsonl.zst`` (the source's index rows, written when a pack is complete; rebuilt from the
shard headers if missing).

A pack shard: b"TDP1" | u32 header length | zstd(header JSON) | the actions of its episodes (one zstd
frame) | their check bits (raw: ``CHECK_BITS`` per step, each episode from a byte boundary). The
header lists, per episode: id, steps, chunks, the source's first-chunk ``meta`` and last-chunk
``row`` (its index row, without the wall-clock columns, which ``wall`` keeps), the ``replay``
settings (``replay.replay_spec``), and ``ends``, the fingerprint chain (``format.fingerprint``) at
each chunk end: the last one is the episode's fingerprint. Frames carry CRC32s.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from trajdata.config import atomic_write_bytes
from trajdata.errors import DataError
from trajdata.format.dataset import rows_to_table
from trajdata.format.schema import Schema, get_schema

PACK_JSON = "pack.json"
PACK_FORMAT = "trajdata-pack"
PACK_VERSION = 1
SHARD_DIR = "shards"
INDEX_FILE = "index.jsonl.zst"
EXT = "tdp"
MAGIC = b"TDP1"
CHECK_BITS = 2
ZSTD_LEVEL = 19
_dctx = zstandard.ZstdDecompressor(max_window_size=2**27)


def pack_shard_name(source_shard: str) -> str:
    """``shard-000012.tar`` -> ``shard-000012.tdp``."""
    return source_shard.rsplit(".", 1)[0] + "." + EXT


def shard_number(name: str) -> int:
    """``shard-000012.tar`` (or ``.tdp``) -> 12."""
    stem = Path(name).name.split(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"{name}: not a shard-NNNNNN file name") from None


@dataclass
class PackedEpisode:
    id: str
    steps: int
    chunks: int
    meta: dict
    row: dict
    wall: dict
    replay: dict
    ends: list[int]
    actions: np.ndarray = field(repr=False)
    checks: np.ndarray = field(repr=False)

    def header(self) -> dict:
        return {"id": self.id, "steps": self.steps, "chunks": self.chunks, "meta": self.meta, "row": self.row,
                "wall": self.wall, "replay": self.replay, "ends": [f"{e:016x}" for e in self.ends]}

    @classmethod
    def from_header(cls, h: dict, actions: np.ndarray, checks: np.ndarray) -> "PackedEpisode":
        return cls(h["id"], int(h["steps"]), int(h["chunks"]), h["meta"], h["row"], h["wall"], h["replay"],
                   [int(x, 16) for x in h["ends"]], actions, checks)


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    v = np.zeros(-(-len(values) // per) * per, np.uint8)
    v[: len(values)] = values
    v = v.reshape(-1, per)
    out = np.zeros(len(v), np.uint8)
    for i in range(per):
        out |= v[:, i] << (bits * i)
    return out


def _unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    mask = (1 << bits) - 1
    v = np.stack([(packed >> (bits * i)) & mask for i in range(per)], axis=1).reshape(-1)
    return v[:n].astype(np.uint8)


def encode_pack_shard(source: dict, chunk_steps: int, episodes: list[PackedEpisode]) -> bytes:
    """One pack shard's bytes; ``source`` describes the dataset shard it packs (name, bytes, sha256)."""
    actions = np.concatenate([e.actions for e in episodes]) if episodes else np.zeros(0, np.uint8)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    act_blob = cctx.compress(np.ascontiguousarray(actions, np.uint8).tobytes())
    checks, at = [], 0
    eps = []
    for e in episodes:
        packed = _pack_bits(e.checks, CHECK_BITS)
        eps.append(dict(e.header(), checks=[at, at + len(packed)]))
        checks.append(packed)
        at += len(packed)
    chk_blob = np.concatenate(checks).tobytes() if checks else b""
    header = {"source": source, "chunk_steps": chunk_steps, "check_bits": CHECK_BITS, "episodes": eps,
              "actions": {"offset": 0, "nbytes": len(act_blob), "crc32": zlib.crc32(act_blob), "dtype": "|u1"},
              "checks": {"offset": len(act_blob), "nbytes": len(chk_blob), "crc32": zlib.crc32(chk_blob)}}
    hjson = cctx.compress(json.dumps(header, separators=(",", ":")).encode())
    return b"".join([MAGIC, struct.pack("<I", len(hjson)), hjson, act_blob, chk_blob])


def decode_pack_shard(blob: bytes, where: str) -> tuple[dict, list[PackedEpisode]]:
    """(header, episodes) of a pack shard's bytes; a corrupt or truncated one is a one-line DataError."""
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise DataError(f"{where}: not a trajdata pack shard (bad magic)")
    (n,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(_dctx.decompress(blob[8 : 8 + n]))
        payload = memoryview(blob)[8 + n :]
        frames = {}
        for key in ("actions", "checks"):
            e = header[key]
            raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
            if len(raw) != e["nbytes"] or zlib.crc32(raw) != e["crc32"]:
                raise DataError(f"{where}: {key}: checksum mismatch (corrupt pack)")
            frames[key] = raw
        actions = np.frombuffer(_dctx.decompress(frames["actions"]), np.uint8)
        checks = np.frombuffer(bytes(frames["checks"]), np.uint8)
        bits, out, at = int(header["check_bits"]), [], 0
        for h in header["episodes"]:
            steps = int(h["steps"])
            a, b = h["checks"]
            if at + steps > len(actions) or not 0 <= a <= b <= len(checks):
                raise DataError(f"{where}: episode {h['id']}: its actions or checks lie outside the shard (corrupt pack)")
            out.append(PackedEpisode.from_header(h, actions[at : at + steps], _unpack_bits(checks[a:b], bits, steps)))
            at += steps
        if at != len(actions):
            raise DataError(f"{where}: {len(actions) - at} actions belong to no episode (corrupt pack)")
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, zstandard.ZstdError) as e:
        raise DataError(f"{where}: unreadable pack shard ({type(e).__name__}: {e}) (corrupt pack)") from None
    return header, out


class Pack:
    """Read access to a pack directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / PACK_JSON
        if not self.root.is_dir():
            raise DataError(f"pack directory {self.root} does not exist")
        if not path.is_file():
            raise DataError(f"{self.root} is not a trajdata pack (no {PACK_JSON})")
        try:
            self.info = json.loads(path.read_text())
        except ValueError:
            raise DataError(f"{path} is not valid JSON") from None
        if not isinstance(self.info, dict) or self.info.get("format") != PACK_FORMAT:
            raise DataError(f"{path}: not a trajdata pack description")
        if self.info.get("version") != PACK_VERSION:
            raise DataError(f"{path}: pack version {self.info.get('version')!r} is not supported (this trajdata reads "
                            f"{PACK_VERSION})")
        self.schema: Schema = get_schema(self.info["schema"])
        self._rows: list[dict] | None = None

    @property
    def dataset_info(self) -> dict:
        """The source dataset's ``dataset.json``."""
        return self.info["dataset"]

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def shard_paths(self) -> list[Path]:
        return sorted(self.shard_dir.glob(f"shard-*.{EXT}")) if self.shard_dir.is_dir() else []

    def read_shard(self, name: str) -> tuple[dict, list[PackedEpisode]]:
        """A pack shard by its name or its source shard's (``shard-000003.tar``)."""
        path = self.shard_dir / pack_shard_name(name)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"pack shard {path} does not exist") from None
        return decode_pack_shard(blob, f"pack shard {path}")

    def index_rows(self) -> list[dict]:
        """The source dataset's index rows (as ``Dataset.index_rows`` reads them), sorted by id."""
        if self._rows is None:
            path = self.root / INDEX_FILE
            if path.is_file():
                try:
                    rows = [json.loads(line) for line in _dctx.decompress(path.read_bytes()).splitlines()]
                except (ValueError, zstandard.ZstdError):
                    raise DataError(f"{path}: unreadable (corrupt pack); delete it to rebuild it from the shards") from None
            else:
                rows = [dict(e.row, shard=h["source"]["name"], **e.wall)
                        for p in self.shard_paths() for h, eps in [self.read_shard(p.name)] for e in eps]
            self._rows = rows_to_table(sorted(rows, key=lambda r: r["id"])).to_pylist()
        return self._rows


def is_pack(root: str | os.PathLike) -> bool:
    return (Path(root) / PACK_JSON).is_file()


def write_index(root: Path, rows: list[dict]) -> None:
    lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in sorted(rows, key=lambda r: r["id"]))
    atomic_write_bytes(root / INDEX_FILE, zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(lines.encode()))
