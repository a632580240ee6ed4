"""Packs benchmark: bytes/step of packs, unpack equal to the source, and the steps/s per core of
unpack and of the loader streaming a pack beside the loader on the dataset (stream decode).

1. Data: scripted NetHack games (collected here), Atari games (a uniformly random policy on Boxing,
   whose bouts last two game minutes, recorded by `eval --record`) and AutoAscend games
   (`--autoascend D`, else a few collected here when AutoAscend is installed; skipped otherwise).
2. Per dataset, one process: `pack` (verify on) -> bytes/step of the whole pack directory; `unpack`
   -> steps/s (wall, and per CPU second of this process: per core) and equality with the source
   (sha256 of every field of every episode, the index rows, the shard files byte for byte).
3. Loader, lanes, all fields, in this process (per core): from the dataset, from the pack (every
   episode re-simulated, every step checked). Rounds interleave, best round each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROUNDS = 2


def digests(root) -> dict:
    from trajdata.format.dataset import Dataset

    ds = Dataset(root)
    out = {}
    for row in ds.index_rows():
        chunks = list(ds.episode(row["id"]))
        out[row["id"]] = {f: hashlib.sha256(np.ascontiguousarray(np.concatenate([c.fields[f] for c in chunks]))
                                            .tobytes()).hexdigest() for f in ds.schema.names}
    return out


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - t0, time.process_time() - c0


def loader_rate(root, B: int = 4, T: int = 1024) -> tuple[float, float]:
    from trajdata.loaders import LoaderConfig, TrajectoryStream

    stream = TrajectoryStream(LoaderConfig(str(root), batch_size=B, seq_len=T, mode="lanes", seed=0))
    steps, wall, cpu = timed(lambda: sum(int(b["mask"].sum()) for b in stream))
    return steps / wall, steps / cpu


def bench(name: str, src: Path, work: Path) -> dict:
    from trajdata.format.dataset import Dataset
    from trajdata.packs.build import PackConfig, UnpackConfig, pack, unpack

    pk, d2 = work / f"{name}.pack", work / f"{name}.unpacked"
    shutil.rmtree(pk, ignore_errors=True)
    shutil.rmtree(d2, ignore_errors=True)
    s, pack_wall, pack_cpu = timed(lambda: pack(PackConfig(str(src), str(pk)), progress=False))
    u, wall, cpu = timed(lambda: unpack(UnpackConfig(str(pk), str(d2)), progress=False))
    a, b = Dataset(src), Dataset(d2)
    equal = {"digests": digests(src) == digests(d2), "index": a.index_rows() == b.index_rows(),
             "shards_byte_identical": u["shards_byte_identical"]}
    best: dict[str, float] = {}
    for r in range(ROUNDS):
        for kind, root in (("dataset", src), ("pack", pk)) if r % 2 == 0 else (("pack", pk), ("dataset", src)):
            w, c = loader_rate(root)
            best[f"{kind}/wall"] = max(best.get(f"{kind}/wall", 0.0), w)
            best[f"{kind}/cpu"] = max(best.get(f"{kind}/cpu", 0.0), c)
    steps = s["steps"]
    return {"episodes": s["episodes"], "steps": steps, "mean_episode_steps": round(steps / s["episodes"]),
            "source_bytes_per_step": s["source_bytes_per_step"], "pack_bytes": s["pack_bytes"],
            "pack_bytes_per_step": s["bytes_per_step"], "unpacked_equal_to_source": equal,
            "pack_verify_steps_per_cpu_s": round(steps / pack_cpu),
            "unpack_steps_per_s": round(steps / wall), "unpack_steps_per_cpu_s": round(steps / cpu),
            "loader_from_pack_steps_per_s": round(best["pack/wall"]),
            "loader_from_pack_steps_per_cpu_s": round(best["pack/cpu"]),
            "loader_from_dataset_steps_per_s": round(best["dataset/wall"]),
            "loader_from_dataset_steps_per_cpu_s": round(best["dataset/cpu"])}


def scripted(work: Path, episodes: int, max_steps: int) -> Path:
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    out = work / "scripted"
    collect(CollectConfig(out=str(out), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"),
                          shards=-(-episodes // 4), episodes_per_shard=4, seed=1234, max_steps=max_steps),
            progress=False)
    return out


def atari(work: Path, episodes: int, game: str) -> Path:
    from trajdata.evaluate import EvalConfig, evaluate

    out = work / "atari"
    evaluate(None, EvalConfig(expert="random", env=game, episodes=episodes, envs=1, record=str(out),
                              out=str(work / "atari-eval"), update_runs=False), progress=False)
    return out


def autoascend_dir(games: int, max_steps: int) -> Path:
    return Path(tempfile.gettempdir()) / f"trajdata-bench-autoascend-{games}x{max_steps}"


def autoascend(work: Path, src: str | None, games: int, max_steps: int) -> Path | str:
    if src is not None:
        return Path(src)
    from trajdata.collectors.install import installed_path, missing_requirements
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    if installed_path() is None or missing_requirements():
        return "AutoAscend is not installed (trajdata experts install autoascend)"
    out = autoascend_dir(games, max_steps)  # shared with bin/bench_format.py: a rerun resumes, not redoes
    collect(CollectConfig(out=str(out), expert=ExpertSpec("trajdata.collectors.autoascend:AutoAscendExpert"),
                          shards=games, episodes_per_shard=1, workers=min(2, games), max_steps=max_steps,
                          stall_seconds=0), progress=False)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON result path")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--scripted-episodes", type=int, default=8)
    ap.add_argument("--scripted-max-steps", type=int, default=2500)
    ap.add_argument("--atari-episodes", type=int, default=3)
    ap.add_argument("--atari-game", default="Boxing")
    ap.add_argument("--autoascend", default=None, metavar="D", help="an AutoAscend dataset (default: collect)")
    ap.add_argument("--autoascend-games", type=int, default=3)
    ap.add_argument("--autoascend-max-steps", type=int, default=20000)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajdata-bench-packs-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    aa = autoascend(work, args.autoascend, args.autoascend_games, args.autoascend_max_steps)
    res["autoascend"] = bench("autoascend", aa, work) if isinstance(aa, Path) else {"skipped": aa}
    res["scripted"] = bench("scripted", scripted(work, args.scripted_episodes, args.scripted_max_steps), work)
    res["atari"] = dict(bench("atari", atari(work, args.atari_episodes, args.atari_game), work), game=args.atari_game)
    res["targets"] = {"autoascend_pack_le_1_byte_per_step": res["autoascend"].get("pack_bytes_per_step", 99) <= 1,
                      "every_unpack_equal": all(r["unpacked_equal_to_source"]["digests"] and
                                                r["unpacked_equal_to_source"]["index"]
                                                for r in res.values() if "steps" in r)}
    res["workdir"] = str(work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
