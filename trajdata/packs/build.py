"""``pack`` and ``unpack``: shards are the units of work, run by the collection runner
(``collectors.runner.run_shards``: worker processes or Ray, retries of dead workers, tqdm, resume).

``pack(PackConfig(source=D, out=P))`` writes one pack shard per dataset shard: per episode its replay
settings, its actions and its step checks, and (``verify``, the default) replays it first, refusing
an episode that does not reproduce its recording. ``unpack(UnpackConfig(pack=P, out=D2))``
re-simulates every episode, checks each step against the pack and writes D2's shards with D's chunk
layout, headers and storage profile, then rebuilds the index (with D's wall-clock columns): D2
decodes to exactly what D holds. A replay that diverges stops the unpack with one line naming the
episode and step; shards already written stay, and a rerun resumes.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trajdata.config import at_least, atomic_write_bytes, choose, coerce_fields, option, require
from trajdata.errors import DataError, TrajdataError
from trajdata.format import fingerprint
from trajdata.format.codec import DEFAULT_PROFILE, PROFILES
from trajdata.format.dataset import (DATASET_JSON, FORMAT_NAME, INDEX_FILE, SHARD_DIR, Dataset, build_index,
                                     create_or_check, shard_name)
from trajdata.format.schema import SCHEMA_VERSION
from trajdata.format.shard import WALL_CLOCK_FIELDS, ShardReader, ShardWriter
from trajdata.packs import store
from trajdata.packs.replay import (EnvPool, EpisodeReplay, EndedEarly, installed_versions, new_chunk, replay_chunks,
                                   replay_spec, version_note)

BACKENDS = ("local", "ray")


_RUN_HELP = dict(
    workers="Parallel worker processes (shards are the units of work).",
    backend="local worker processes, or Ray tasks.",
    ray_address="Ray cluster address (with --backend ray; default: start local Ray).",
    max_shard_retries="Rerun a shard whose worker died this many times, then give it up.")


@dataclass
class PackConfig:
    """The settings of `trajdata pack`."""

    source: str = option(help="The dataset to pack.", cli=False)
    out: str = option(help="Pack directory (created, or resumed).", metavar="DIRECTORY")
    workers: int = option(1, _RUN_HELP["workers"])
    verify: bool = option(True, "Replay every episode while packing and refuse one that does not reproduce its "
                                "recording.")
    backend: str = option("local", _RUN_HELP["backend"], choices=BACKENDS)
    ray_address: str | None = option(None, _RUN_HELP["ray_address"])
    max_shard_retries: int = option(1, _RUN_HELP["max_shard_retries"])

    def __post_init__(self):
        coerce_fields(self)
        _check_run(self)


@dataclass
class UnpackConfig:
    """The settings of `trajdata unpack`."""

    pack: str = option(help="The pack to unpack.", cli=False)
    out: str = option(help="Dataset directory (created, or resumed).", metavar="DIRECTORY")
    workers: int = option(1, _RUN_HELP["workers"])
    backend: str = option("local", _RUN_HELP["backend"], choices=BACKENDS)
    ray_address: str | None = option(None, _RUN_HELP["ray_address"])
    max_shard_retries: int = option(1, _RUN_HELP["max_shard_retries"])

    def __post_init__(self):
        coerce_fields(self)
        _check_run(self)


def _check_run(cfg) -> None:
    at_least(cfg, 1, "workers")
    at_least(cfg, 0, "max_shard_retries")
    choose(cfg.backend, BACKENDS, "backend")
    require(cfg.ray_address is None or cfg.backend == "ray", "ray_address", "needs backend 'ray'")


# ---- per-process state of pack / unpack workers ----------------------------------------------------

_cache: dict = {}


def _pool() -> EnvPool:
    if "pool" not in _cache:
        _cache["pool"] = EnvPool()
    return _cache["pool"]


def _close_pool() -> None:
    """Close this process's envs (the end of an in-process pack or unpack)."""
    pool = _cache.pop("pool", None)
    if pool is not None:
        pool.close()


def _source(cfg: PackConfig) -> tuple[Dataset, dict, str]:
    """The dataset being packed, its index rows by id, and its storage profile (cached per process)."""
    if _cache.get("source") != cfg.source:
        ds = Dataset(cfg.source)
        rows = {r["id"]: r for r in ds.index_rows()} if (ds.root / INDEX_FILE).is_file() else {}
        _cache.update(source=cfg.source, ds=ds, rows=rows, profile=_profile(ds))
    return _cache["ds"], _cache["rows"], _cache["profile"]


def _pack(path: str) -> store.Pack:
    if _cache.get("pack") != path:
        _cache.update(pack=path, pk=store.Pack(path))
    return _cache["pk"]


def _profile(ds: Dataset) -> str:
    """The storage profile ``ds`` was written in (its dataset.json, else read off a chunk header)."""
    named = (ds.info.get("collection") or {}).get("codec")
    if named in PROFILES:
        return named
    for p in ds.shard_paths():
        for h in ShardReader(p).headers():
            entries = [e["data"] for e in h["fields"].values()]
            if any("rows" in e for e in h["fields"].values()):
                return "stream2"
            if any(e.get("stage") == "sparse" for e in entries):
                return "stream"
            return "compact" if any(e.get("stage") == "xor_previous" for e in entries) else "fast"
    return DEFAULT_PROFILE


# ---- pack --------------------------------------------------------------------------------------------

def pack(cfg: PackConfig, progress: bool = True) -> dict:
    """Pack dataset ``cfg.source`` into ``cfg.out`` (resuming); returns a summary."""
    from trajdata.collectors.runner import failure_message, lock_out, run_shards

    ds = Dataset(cfg.source)
    where = f"cannot pack {ds.root}"
    rows = ds.index_rows()
    for r in rows:  # refuse data that cannot be packed before writing anything
        replay_spec(ds.schema.name, ds.info, r, where)
    if ds.schema.name not in ("nethack", "atari"):
        replay_spec(ds.schema.name, ds.info, {}, where)
    kind = ds.schema.name
    out = Path(cfg.out)
    lock = lock_out(out, "pack")
    try:
        info = {"format": store.PACK_FORMAT, "version": store.PACK_VERSION, "schema": ds.schema.name,
                "dataset": ds.info, "codec": _profile(ds), "check_bits": store.CHECK_BITS,
                "verified": cfg.verify, "versions": installed_versions(kind)}
        _create_or_check_pack(out, info)
        (out / store.SHARD_DIR).mkdir(exist_ok=True)
        for p in (out / store.SHARD_DIR).glob("*.tmp"):
            p.unlink()
        shards = [store.shard_number(p.name) for p in ds.shard_paths()]
        todo = [s for s in shards if not (out / store.SHARD_DIR / store.pack_shard_name(shard_name(s))).exists()]
        count = {}
        for r in rows:
            count[store.shard_number(r["shard"])] = count.get(store.shard_number(r["shard"]), 0) + 1
        t0 = time.monotonic()
        _, failed, stats = run_shards(cfg, todo, "pack", progress, work=pack_shard, episodes=lambda s: count.get(s, 0),
                                      tmp_of=lambda s: out / store.SHARD_DIR / (store.pack_shard_name(shard_name(s)) + ".tmp"))
        if failed:
            raise DataError(failure_message(failed))
        pk = store.Pack(out)
        all_rows = [dict(e.row, shard=h["source"]["name"], **e.wall)
                    for p in pk.shard_paths() for h, eps in [pk.read_shard(p.name)] for e in eps]
        store.write_index(out, all_rows)
    finally:
        lock.close()
        _close_pool()
    steps = sum(int(r["steps"]) for r in all_rows)
    pack_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "collect.lock")
    source_bytes = sum(p.stat().st_size for p in ds.shard_paths())
    elapsed = time.monotonic() - t0
    return {"pack": str(out), "shards_written": len(todo), "shards_skipped": len(shards) - len(todo),
            "episodes": len(all_rows), "steps": steps, "pack_bytes": pack_bytes,
            "bytes_per_step": round(pack_bytes / max(steps, 1), 4),
            "source_bytes_per_step": round(source_bytes / max(steps, 1), 3),
            "verified": cfg.verify, "seconds": round(elapsed, 2),
            "steps_per_second": round(stats["steps"] / max(elapsed, 1e-9), 1), "config": asdict(cfg)}


def _create_or_check_pack(out: Path, info: dict) -> None:
    path = out / store.PACK_JSON
    if path.is_file():
        old = store.Pack(out).info
        if json.dumps(old["dataset"], sort_keys=True) != json.dumps(info["dataset"], sort_keys=True):
            raise DataError(f"{out} already holds a pack of another dataset; use another --out")
        return
    atomic_write_bytes(path, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())


def pack_shard(cfg: PackConfig, shard: int, report=None, before_commit=None) -> list[dict]:
    """Pack dataset shard ``shard`` into its pack shard; returns its episodes' index rows."""
    ds, index, _ = _source(cfg)
    path = ds.shard_dir / shard_name(shard)
    where = f"cannot pack {ds.root}"
    reader = ShardReader(path)
    layout: dict[str, list[dict]] = {}
    for h in reader.headers():
        layout.setdefault(h["episode_id"], []).append(h)
    chunk_steps = _chunk_steps(layout, ds, path.name, where)
    episodes, cur = [], None
    for chunk in reader.chunks():
        if chunk.index == 0:
            if cur is not None:
                raise DataError(f"{where}: {path.name}: episodes {cur['id']} and {chunk.episode_id} interleave")
            heads = layout[chunk.episode_id]
            row = dict(heads[-1]["episode"], shard=path.name)
            cur = {"id": chunk.episode_id, "meta": chunk.header.get("episode_meta") or {}, "row": heads[-1]["episode"],
                   "spec": replay_spec(ds.schema.name, ds.info, row, where), "c": np.uint64(fingerprint.CHAIN_START),
                   "actions": [], "checks": [], "ends": [], "steps": 0, "chunks": len(heads)}
            cur["replay"] = (EpisodeReplay(_pool(), ds.schema, cur["spec"], int(row["steps"]), f"{where}: episode "
                                           f"{cur['id']}") if cfg.verify else None)
        try:
            _pack_chunk(cur, chunk.fields, ds.schema, chunk_steps, where)
        except BaseException:
            if cur["replay"] is not None:
                cur["replay"].close()
            raise
        if report is not None:
            report(chunk.steps)
        if chunk.last:
            if cur["replay"] is not None:
                cur["replay"].close()
            wall = {k: index.get(cur["id"], {}).get(k) for k in WALL_CLOCK_FIELDS}
            episodes.append(store.PackedEpisode(
                cur["id"], cur["steps"], cur["chunks"], cur["meta"], cur["row"],
                {k: v for k, v in wall.items() if v is not None}, cur["spec"], cur["ends"],
                np.concatenate(cur["actions"]), np.concatenate(cur["checks"])))
            cur = None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    blob = store.encode_pack_shard({"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()},
                                   chunk_steps, episodes)
    if before_commit is not None:
        before_commit()
    atomic_write_bytes(Path(cfg.out) / store.SHARD_DIR / store.pack_shard_name(path.name), blob)
    return [dict(e.row, shard=path.name, **e.wall) for e in episodes]


def _chunk_steps(layout: dict[str, list[dict]], ds: Dataset, shard: str, where: str) -> int:
    """The chunk size the shard was written with (every episode's chunks but its last hold that many)."""
    sizes = {h["steps"] for heads in layout.values() for h in heads[:-1]}
    longest = max((h["steps"] for heads in layout.values() for h in heads), default=1)
    if len(sizes) > 1 or (sizes and longest > min(sizes)):
        raise DataError(f"{where}: {shard}: chunks of {sorted(sizes | {longest})} steps; a shard is written with one "
                        "chunk size")
    if sizes:
        return sizes.pop()
    named = (ds.info.get("collection") or {}).get("chunk_steps")
    return named if isinstance(named, int) and named >= longest else max(longest, 1)


def _pack_chunk(cur: dict, fields: dict, schema, chunk_steps: int, where: str) -> None:
    n = len(fields["action"])
    if n:
        chained = fingerprint.chain(fingerprint.step_hashes(fields, schema.names), int(cur["c"]))
        cur["checks"].append(fingerprint.check_bits(chained, store.CHECK_BITS))
        cur["c"] = chained[-1]
    cur["ends"].append(int(cur["c"]))
    cur["actions"].append(np.asarray(fields["action"], np.uint8))
    rep = cur["replay"]
    if rep is not None and n:
        got = new_chunk(schema, n)
        try:
            rep.play(fields["action"], got)
            ended = None
        except EndedEarly as e:
            ended = e.step - cur["steps"]
        m = n if ended is None else ended + 1
        differ = np.zeros(m, bool)
        for name in schema.names:
            if not np.array_equal(got[name][:m], fields[name][:m]):
                differ |= (got[name][:m] != fields[name][:m]).reshape(m, -1).any(axis=1)
        if differ.any():
            i = int(np.argmax(differ))
            bad = [name for name in schema.names if not np.array_equal(got[name][i], fields[name][i])]
            if bad:
                raise DataError(f"{where}: episode {cur['id']}: replaying it diverges from the recording at step "
                                f"{cur['steps'] + i} ({', '.join(bad)} differ{'s' if len(bad) == 1 else ''}): recorded "
                                f"with another {'nle' if schema.name == 'nethack' else 'ale-py'} version, or before "
                                "trajdata pinned the game's start time?")
        if ended is not None:
            raise DataError(f"{where}: episode {cur['id']}: replaying it, the game ends at step "
                            f"{cur['steps'] + ended}; the recording goes on")
    cur["steps"] += n


# ---- unpack ------------------------------------------------------------------------------------------

def unpack(cfg: UnpackConfig, progress: bool = True) -> dict:
    """Re-simulate pack ``cfg.pack`` into dataset ``cfg.out`` (resuming); returns a summary."""
    from trajdata.collectors.runner import failure_message, lock_out, run_shards, shard_problem

    pk = store.Pack(cfg.pack)
    note = version_note(pk.info.get("versions") or {}, pk.schema.name)
    if note:
        print(f"trajdata: warning: {note[2:]}: replays may diverge (unpack then stops naming the episode "
              f"and step)", file=sys.stderr)
    headers = {store.shard_number(p.name): pk.read_shard(p.name) for p in pk.shard_paths()}
    all_rows = [dict(e.row, shard=h["source"]["name"], **e.wall) for h, eps in headers.values() for e in eps]
    out = Path(cfg.out)
    lock = lock_out(out, "unpack")
    try:
        info = {k: v for k, v in pk.dataset_info.items() if k not in ("format", "schema_version")}
        if pk.dataset_info.get("format") != FORMAT_NAME or pk.dataset_info.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"pack {pk.root}: its dataset is of schema version {pk.dataset_info.get('schema_version')!r}; "
                            f"this trajdata writes {SCHEMA_VERSION}")
        create_or_check(out, info)
        for p in [*(out / SHARD_DIR).glob("shard-*.tar.tmp"), out / (INDEX_FILE + ".tmp"), out / (DATASET_JSON + ".tmp")]:
            p.unlink(missing_ok=True)
        for s in headers:
            path = out / SHARD_DIR / shard_name(s)
            if path.exists() and shard_problem(path) is not None:
                print(f"trajdata: warning: {path} is truncated ({shard_problem(path)}); unpacking it again",
                      file=sys.stderr)
                path.unlink()
        todo = [s for s in sorted(headers) if not (out / SHARD_DIR / shard_name(s)).exists()]
        t0 = time.monotonic()
        try:
            _, failed, stats = run_shards(cfg, todo, "unpack", progress, work=unpack_shard,
                                          episodes=lambda s: len(headers[s][1]))
        finally:
            try:  # what is finished is usable, even when a replay diverged
                build_index(out, wall_clock=all_rows)
            except TrajdataError:
                pass
        if failed:
            raise DataError(failure_message(failed))
    finally:
        lock.close()
        _close_pool()
    elapsed = time.monotonic() - t0
    identical = sum(_sha256(out / SHARD_DIR / h["source"]["name"]) == h["source"]["sha256"] for h, _ in headers.values())
    return {"out": str(out), "shards_written": len(todo), "shards_skipped": len(headers) - len(todo),
            "episodes": len(all_rows), "steps_written": stats["steps"], "seconds": round(elapsed, 2),
            "steps_per_second": round(stats["steps"] / max(elapsed, 1e-9), 1),
            "shards_byte_identical": f"{identical}/{len(headers)}", "config": asdict(cfg)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack_shard(cfg: UnpackConfig, shard: int, report=None, before_commit=None) -> list[dict]:
    """Re-simulate pack shard ``shard`` into the dataset shard it packs; returns its index rows."""
    pk = _pack(cfg.pack)
    header, episodes = pk.read_shard(shard_name(shard))
    path = Path(cfg.out) / SHARD_DIR / header["source"]["name"]
    where = f"pack {pk.root}"
    note = version_note(pk.info.get("versions") or {}, pk.schema.name)
    rows = []
    with ShardWriter(path, pk.schema, header["chunk_steps"], pk.info["codec"], before_commit=before_commit) as sw:
        for ep in episodes:
            ew = sw.episode(ep.id, ep.meta)
            for arrays in replay_chunks(_pool(), pk.schema, ep, header["chunk_steps"], where, note, reuse=True,
                                        bits=header["check_bits"]):
                ew.extend(arrays)
                if report is not None:
                    report(len(arrays["action"]))
            row = ew.close({k: v for k, v in ep.row.items() if k not in ("id", "steps", "chunks")})
            if row["chunks"] != ep.chunks:
                raise DataError(f"{where}: episode {ep.id}: {row['chunks']} chunks written, the pack lists "
                                f"{ep.chunks} (corrupt pack)")
            rows.append(dict(row, shard=path.name, **ep.wall))
    return rows
