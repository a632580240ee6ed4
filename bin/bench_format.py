"""Storage and decode benchmark, side by side on the same NLE games.

1. Collect games with the scripted expert into a trajdata dataset (all NLD-AA-L fields).
2. Replay each game's recorded actions from its recorded seeds in NLE with NLE's own ttyrec.bz2
   recorder on (the NLD format), checking every tty frame matches ours: the same games.
3. Report bytes/step (trajdata all fields, trajdata tty fields, NLE ttyrec.bz2), encode and decode
   steps/s on one core, and the `nle.dataset.TtyrecDataset` loader's steps/s on those ttyrecs.
4. AutoAscend games (busier: menus, overlays), `--autoascend D` or N games collected here when
   AutoAscend is installed: the same games in the previous default profile (stream) and the
   current one (stream2), before/after side by side in one run (rounds interleaved, best round each):
   bytes/step; full decode, tty decode, the loader's (lanes; all and tty fields) and encode steps per
   CPU second (this process's: a shared machine's load disturbs CPU time far less than wall time),
   beside NLE's ttyrec.bz2 of the same games (replayed, every frame checked).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from trajdata.importers.ttyrec import export_ttyrecs
from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
from trajdata.format import codec
from trajdata.format.codec import DEFAULT_PROFILE, PROFILES
from trajdata.format.dataset import Dataset
from trajdata.format.schema import TTY_FIELDS


ROUNDS = 3


def nld_loader_rate(root: Path, name: str, total_steps: int, batch: int, seq: int, threads: int) -> dict:
    import nle.dataset as nld
    from concurrent.futures import ThreadPoolExecutor

    db = str(root / "ttyrecs.db")
    if not os.path.exists(db):
        nld.db.create(db)
        nld.add_nledata_directory(str(root), name, filename=db)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    ds = nld.TtyrecDataset(name, batch_size=batch, seq_length=seq, dbfilename=db, threadpool=pool, shuffle=False)
    t0 = time.perf_counter()
    delivered = 0
    for mb in ds:
        delivered += int(mb["tty_chars"].shape[0] * mb["tty_chars"].shape[1])
    dt = time.perf_counter() - t0
    if pool:
        pool.shutdown()
    return {"batch": batch, "seq": seq, "threads": threads, "seconds": round(dt, 3),
            "steps_per_s": round(total_steps / dt), "slots_delivered": delivered}


def decode_rate(ds: Dataset, fields, repeat: int = 3) -> float:
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        steps = 0
        for p in ds.shard_paths():
            for c in ds.shard(p.name).chunks(fields):
                steps += c.steps
        best = max(best, steps / (time.perf_counter() - t0))
    return best


def encode_rate(ds: Dataset, profile: str) -> float:
    chunks = [c for p in ds.shard_paths() for c in ds.shard(p.name).chunks(None)]
    t0 = time.perf_counter()
    for c in chunks:
        codec.encode_chunk(ds.schema, c.fields, {"bench": True}, profile=profile)
    return sum(c.steps for c in chunks) / (time.perf_counter() - t0)


def cpu_rate(fn) -> float:
    """Steps per CPU second of this process (a shared machine's load disturbs it far less than wall time)."""
    t0 = time.process_time()
    steps = fn()
    return steps / (time.process_time() - t0)


def loader_steps(root: Path, fields=None, B: int = 4, T: int = 2048) -> int:
    from trajdata.loaders import LoaderConfig, TrajectoryStream

    stream = TrajectoryStream(LoaderConfig(str(root), fields=fields, batch_size=B, seq_len=T, mode="lanes", seed=0))
    return sum(int(b["mask"].sum()) for b in stream)


def decode_steps(ds: Dataset, fields) -> int:
    return sum(c.steps for p in ds.shard_paths() for c in ds.shard(p.name).chunks(fields))


def encode_steps(ds: Dataset, profile: str) -> int:
    steps = 0
    for p in ds.shard_paths():
        for c in ds.shard(p.name).chunks(None):
            codec.encode_chunk(ds.schema, c.fields, {"bench": True}, profile=profile)
            steps += c.steps
    return steps


def autoascend_dir(games: int, max_steps: int) -> Path:
    return Path(tempfile.gettempdir()) / f"trajdata-bench-autoascend-{games}x{max_steps}"


def autoascend(src: str | None, games: int, max_steps: int, work: Path) -> dict:
    """Before (stream) / after (stream2) on the same AutoAscend games, beside NLE's ttyrec.bz2 of them."""
    from trajdata.format.dataset import recode

    if src is None:
        from trajdata.collectors.install import installed_path, missing_requirements

        if games == 0:
            return {"skipped": "--autoascend-games 0"}
        if installed_path() is None or missing_requirements():
            return {"skipped": "AutoAscend is not installed (trajdata experts install autoascend)"}
        src = autoascend_dir(games, max_steps)  # shared with bin/bench_packs.py: a rerun resumes, not redoes
        collect(CollectConfig(out=str(src), expert=ExpertSpec("trajdata.collectors.autoascend:AutoAscendExpert"),
                              shards=games, episodes_per_shard=1, workers=min(2, games), max_steps=max_steps,
                              stall_seconds=0), progress=False)
    before, after = "stream", DEFAULT_PROFILE
    data = {}
    for profile in (before, after):
        recode(src, work / f"aa-{profile}", profile)
        data[profile] = Dataset(work / f"aa-{profile}")
    rows = data[after].index_rows()
    steps = sum(r["steps"] for r in rows)
    ttydir = work / "aa-nld"
    if not any(ttydir.rglob("*.ttyrec*.bz2")):
        shutil.rmtree(ttydir, ignore_errors=True)
        checked = export_ttyrecs(data[after], ttydir)
    else:
        checked = "reused"
    ttyrec_bytes = sum(f.stat().st_size for f in ttydir.rglob("*.ttyrec*.bz2"))
    best: dict[str, float] = {}
    for r in range(ROUNDS):
        for profile in (before, after) if r % 2 == 0 else (after, before):
            ds = data[profile]
            for key, fn in (("all", lambda: decode_steps(ds, None)), ("tty", lambda: decode_steps(ds, list(TTY_FIELDS))),
                            ("loader", lambda: loader_steps(ds.root)),
                            ("loader_tty", lambda: loader_steps(ds.root, TTY_FIELDS)),
                            ("encode", lambda: encode_steps(ds, profile))):
                best[f"{profile}/{key}"] = max(best.get(f"{profile}/{key}", 0.0), cpu_rate(fn))
    out = {"games": len(rows), "steps": steps, "episode_steps": [r["steps"] for r in rows],
           "frames_replayed_identical": checked, "nle_ttyrec_bz2_bytes_per_step_tty_only": round(ttyrec_bytes / steps, 3)}
    for tag, profile in (("before", before), ("after", after)):
        ds = data[profile]
        field_bytes: dict[str, int] = {}
        for p in ds.shard_paths():
            for h in ds.shard(p.name).headers():
                for name, parts in h["fields"].items():
                    field_bytes[name] = field_bytes.get(name, 0) + sum(x.get("nbytes", 0) for x in parts.values())
        out[tag] = {"profile": profile,
                    "all_fields_bytes_per_step": round(sum(p.stat().st_size for p in ds.shard_paths()) / steps, 3),
                    "decode_all_steps_per_cpu_s": round(best[f"{profile}/all"]),
                    "decode_tty_steps_per_cpu_s": round(best[f"{profile}/tty"]),
                    "loader_all_lanes_steps_per_cpu_s": round(best[f"{profile}/loader"]),
                    "loader_tty_lanes_steps_per_cpu_s": round(best[f"{profile}/loader_tty"]),
                    "encode_all_steps_per_cpu_s": round(best[f"{profile}/encode"]),
                    "per_field": {k: round(v / steps, 3) for k, v in sorted(field_bytes.items(), key=lambda kv: -kv[1])}}
    b, a = out["before"], out["after"]
    out["after_vs_before"] = {k: round(a[k] / b[k], 3) for k in a if k not in ("profile", "per_field")}
    out["targets"] = {"after_le_20_bytes_per_step": a["all_fields_bytes_per_step"] <= 20,
                      "decode_not_slower_than_10pct": min(a[k] / b[k] for k in a if k.startswith(("decode", "loader")))
                                                      >= 0.9}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON result path")
    ap.add_argument("--episodes", type=int, default=32, help="games (>= 32: the NLD loader needs a full batch)")
    ap.add_argument("--max-steps", type=int, default=2500)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--autoascend", default=None, metavar="D", help="AutoAscend dataset for section 4")
    ap.add_argument("--autoascend-games", type=int, default=3, help="without --autoascend: games to collect (0: skip)")
    ap.add_argument("--autoascend-max-steps", type=int, default=20000)
    ap.add_argument("--only-autoascend", action="store_true", help="skip sections 1-3")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajdata-bench-"))
    if args.only_autoascend:
        out = {"autoascend": autoascend(args.autoascend, args.autoascend_games, args.autoascend_max_steps, work),
               "workdir": str(work)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return
    per_shard = 8
    profiles = {}
    for profile in PROFILES:
        data = work / f"trajdata-{profile}"
        res = collect(CollectConfig(out=str(data), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"),
                                    shards=-(-args.episodes // per_shard), episodes_per_shard=per_shard, workers=1,
                                    seed=1234, max_steps=args.max_steps, codec=profile), progress=False)
        ds = Dataset(data)
        steps = sum(r["steps"] for r in ds.index_rows())
        field_bytes: dict[str, int] = {}
        for p in ds.shard_paths():
            for h in ds.shard(p.name).headers():
                for name, parts in h["fields"].items():
                    field_bytes[name] = field_bytes.get(name, 0) + sum(x.get("nbytes", 0) for x in parts.values())
        shard_bytes = sum(p.stat().st_size for p in ds.shard_paths())
        profiles[profile] = {
            "ds": ds, "steps": steps, "collect_steps_per_s": res["steps_per_second"] if res["shards_written"] else None,
            "all_fields_shard_files": round(shard_bytes / steps, 3),
            "tty_fields": round(sum(field_bytes[f] for f in TTY_FIELDS) / steps, 3),
            "per_field": {k: round(v / steps, 3) for k, v in sorted(field_bytes.items(), key=lambda kv: -kv[1])},
        }
    ds = profiles["compact"]["ds"]
    steps = profiles["compact"]["steps"]
    ttydir = work / "nld"
    if (ttydir / "ttyrecs.db").is_file():  # a reused workdir: keep its checked ttyrecs (see export_ttyrecs)
        checked = "reused"
    else:
        shutil.rmtree(ttydir, ignore_errors=True)
        checked = export_ttyrecs(ds, ttydir)
        nld_loader_rate(ttydir, "bench", steps, 32, 32, 1)  # creates ttyrecs.db: marks the replay complete
    ttyrec_bytes = sum(f.stat().st_size for f in ttydir.rglob("*.ttyrec*.bz2"))
    # Rounds interleave NLD and trajdata; each figure is its best round (this machine is noisy).
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = max(best.get(key, 0.0), value)

    for _ in range(ROUNDS):
        keep("nld32", nld_loader_rate(ttydir, "bench", steps, 32, 32, 1)["steps_per_s"])
        keep("nld4096", nld_loader_rate(ttydir, "bench", steps, 32, 4096, 1)["steps_per_s"])
        for name, p in profiles.items():
            keep(f"{name}/tty", decode_rate(p["ds"], list(TTY_FIELDS), repeat=1))
            keep(f"{name}/all", decode_rate(p["ds"], None, repeat=1))
            keep(f"{name}/encode", encode_rate(p["ds"], name))
    nld32, nld4096 = {"steps_per_s": round(best["nld32"])}, {"steps_per_s": round(best["nld4096"])}
    for name, p in profiles.items():
        assert p["steps"] == steps, "profiles collected different games"
        p["decode_tty_steps_per_s"] = round(best[f"{name}/tty"])
        p["decode_all_steps_per_s"] = round(best[f"{name}/all"])
        p["encode_all_steps_per_s"] = round(best[f"{name}/encode"])
        p["decode_tty_speedup_vs_nld_s32"] = round(p["decode_tty_steps_per_s"] / nld32["steps_per_s"], 1)
        p["all_fields_bytes_vs_nld_tty"] = round(p["all_fields_shard_files"] / (ttyrec_bytes / steps), 3)
        del p["ds"]
    out = {
        "games": len(ds.index_rows()), "steps": steps, "frames_replayed_identical": checked,
        "nle_ttyrec_bz2_bytes_per_step_tty_only": round(ttyrec_bytes / steps, 3),
        "nld_TtyrecDataset_steps_per_s_1core": {"b32_s32": nld32["steps_per_s"], "b32_s4096": nld4096["steps_per_s"]},
        "trajdata": profiles,
        "default_profile": DEFAULT_PROFILE,
        "targets": {
            **{f"{n}_all_fields_bytes_le_nld_tty": p["all_fields_bytes_vs_nld_tty"] <= 1.0 for n, p in profiles.items()},
            **{f"{n}_tty_decode_ge_10x_nld": p["decode_tty_speedup_vs_nld_s32"] >= 10 for n, p in profiles.items()},
        },
        "autoascend": autoascend(args.autoascend, args.autoascend_games, args.autoascend_max_steps, work),
        "workdir": str(work),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
