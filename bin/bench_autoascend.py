"""AutoAscend collection benchmark: bare agent loop (the anchor) vs through trajdata, side by side.

1. Overhead: the same seeded games (same character, same step cap, so identical keypresses) played
   (a) bare: AutoAscend on the adapter over NetHackChallenge, nothing recorded, and
   (b) through trajdata: RecordingEnv + shard writing (`runner.run_shard`), in the same process,
   in ABBA order per game. overhead_wall = extra wall time of (b) over (a), as a fraction of (b)
   (i.e. 1 - steps/s(b) / steps/s(a)); overhead_accounted = seconds inside trajdata's recording and
   writing code (timed directly) / bare seconds, which a noisy shared machine disturbs far less.
   Target <= 5%.
2. Parallel efficiency: `collect` of the same shards with 1 and 2 workers; efficiency =
   (steps/s with 2 workers) / (2 x steps/s with 1 worker), end to end (worker start-up included)
   and per episode (each episode's steps / wall seconds; start-up excluded). Target >= 0.9.
   Anchor, side by side: the same for bare AutoAscend games in 1 vs 2 processes (nothing recorded),
   i.e. how far this machine itself lets two games scale.
3. Storage on AutoAscend games (busier than the scripted ones: menus, overlays): bytes/step of the
   parallel run's dataset vs NLE's ttyrec.bz2 recording of the same games.

Needs AutoAscend installed (`trajdata experts install autoascend`); otherwise says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym



class _Cap(Exception):
    pass


class _StepCap(gym.Wrapper):
    def __init__(self, env, max_steps: int):
        super().__init__(env)
        self.max_steps, self.steps = max_steps, 0

    def step(self, action):
        if self.steps >= self.max_steps:
            raise _Cap()
        self.steps += 1
        return self.env.step(action)


def bare_game(expert, env, seed: int, max_steps: int) -> tuple[int, float]:
    from trajdata.collectors.autoascend import AutoAscendEnv, import_autoascend

    obs, info, _ = expert.reset_env(env, seed)
    capped = _StepCap(env, max_steps)
    agent = import_autoascend(expert.cfg.source).Agent(AutoAscendEnv(capped, obs, info))
    t = time.perf_counter()
    try:
        agent.main()
    except _Cap:
        pass
    return capped.steps, time.perf_counter() - t


def trajdata_game(cfg, shard: int) -> tuple[int, float]:
    from trajdata.collectors.worker import run_shard

    t = time.perf_counter()
    rows = run_shard(cfg, shard)
    return sum(r["steps"] for r in rows), time.perf_counter() - t


class _Timers:
    """Seconds spent inside trajdata's recording and writing code (patched onto EpisodeWriter)."""

    def __init__(self):
        from trajdata.format import shard

        self.by_name = {"append": 0.0, "set_outcome": 0.0, "_flush": 0.0}  # _flush: encode + write a chunk
        for name in self.by_name:
            setattr(shard.EpisodeWriter, name, self._timed(name, getattr(shard.EpisodeWriter, name)))

    @property
    def seconds(self) -> float:
        return sum(self.by_name.values())

    def _timed(self, name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.by_name[name] += time.perf_counter() - t
        return wrapper


def overhead(games: int, max_steps: int, character: str) -> dict:
    from trajdata.collectors.config import CollectConfig, ExpertSpec
    from trajdata.collectors.worker import _expert_and_env, episode_seed
    from trajdata.format.dataset import create_or_check

    timers = _Timers()
    spec = ExpertSpec("trajdata.collectors.autoascend:AutoAscendExpert", {"character": character})
    expert, env = _expert_and_env(spec)  # the runner's worker cache: run_shard reuses this expert and env
    bare_game(expert, env, 12345, 1000)  # warm-up: imports, numba
    rows = []
    for g in range(games):
        seed = episode_seed(0, g, 0)
        bare, ours = [], []
        for order in ("bare", "ours", "ours", "bare"):  # ABBA against drift on a shared machine
            if order == "bare":
                bare.append(bare_game(expert, env, seed, max_steps))
                continue
            tmp = tempfile.mkdtemp(prefix="bench-aa-")
            cfg = CollectConfig(out=tmp, expert=spec, shards=games, max_steps=max_steps, stall_seconds=None)
            create_or_check(tmp, {"schema": "nethack", "env": "NetHackChallenge-v0", "expert": expert.describe(), "collection": {}})
            before = timers.seconds
            ours.append(trajdata_game(cfg, g) + (timers.seconds - before,))
        steps = bare[0][0]
        b_sec = sum(x[1] for x in bare) / len(bare)
        o_sec = sum(x[1] for x in ours) / len(ours)
        rec_sec = sum(x[2] for x in ours) / len(ours)
        rows.append({"seed": seed, "steps": steps, "bare_steps_s": round(steps / b_sec, 1),
                     "trajdata_steps_s": round(steps / o_sec, 1), "recording_seconds": round(rec_sec, 3),
                     "bare_seconds": round(b_sec, 3), "trajdata_seconds": round(o_sec, 3),
                     "same_steps": all(x[0] == steps for x in bare + ours)})
    b = sum(r["bare_seconds"] for r in rows)
    o = sum(r["trajdata_seconds"] for r in rows)
    rec = sum(r["recording_seconds"] for r in rows)
    n = sum(r["steps"] for r in rows)
    return {"games": rows, "bare_steps_per_s": round(n / b, 1), "trajdata_steps_per_s": round(n / o, 1),
            "overhead_wall": round(1 - b / o, 4),
            "overhead_accounted": round(rec / b, 4),
            "recording_us_per_step": round(1e6 * rec / n, 1),
            "recording_us_per_step_by_part": {k: round(1e6 * v / (2 * n), 1) for k, v in timers.by_name.items()},
            "all_runs_identical_length": all(r["same_steps"] for r in rows)}


def _bare_worker(character: str, seeds: list[int], max_steps: int, barrier) -> tuple[int, float]:
    from trajdata.collectors.config import ExpertSpec
    from trajdata.collectors.worker import _expert_and_env

    expert, env = _expert_and_env(ExpertSpec("trajdata.collectors.autoascend:AutoAscendExpert", {"character": character}))
    bare_game(expert, env, 12345, 1000)  # warm-up: imports, numba
    barrier.wait()
    steps = seconds = 0.0
    for seed in seeds:
        n, sec = bare_game(expert, env, seed, max_steps)
        steps, seconds = steps + n, seconds + sec
    return int(steps), seconds


def bare_parallel(games: int, max_steps: int, character: str) -> dict:
    """The machine's own scaling, the anchor: bare AutoAscend games (nothing recorded) in 1 process,
    then in 2 processes at once (started together after warm-up); efficiency = per-process steps/s
    with 2 / steps/s alone."""
    import multiprocessing as mp
    from trajdata.collectors.runner import episode_seed, threads_env

    ctx = mp.get_context("spawn")
    seeds = [episode_seed(1, g, 0) for g in range(games)]
    rates = {}
    with threads_env(1), ctx.Manager() as manager:
        for procs in (1, 2):
            barrier = manager.Barrier(procs)
            with ctx.Pool(procs) as pool:
                res = pool.starmap(_bare_worker, [(character, seeds, max_steps, barrier)] * procs)
            rates[procs] = [n / sec for n, sec in res]
    alone, together = rates[1][0], sum(rates[2]) / 2
    return {"alone_steps_per_s": round(alone, 1), "two_at_once_steps_per_s_each": [round(r, 1) for r in rates[2]],
            "efficiency": round(together / alone, 3)}


def parallel(shards: int, max_steps: int, character: str) -> dict:
    """`trajdata collect autoascend` with 1 and 2 workers, each in a fresh process (both pay start-up:
    imports, numba cache loads); per episode = median of steps / wall seconds over the episodes."""
    import subprocess

    from trajdata.format.dataset import Dataset

    out = {}
    for workers in (1, 2):
        tmp = tempfile.mkdtemp(prefix=f"bench-aa-w{workers}-")
        cmd = [sys.executable, "-m", "trajdata.cli", "collect", "autoascend", "--out", tmp, "--shards", str(shards),
               "--workers", str(workers), "--max-steps", str(max_steps), "--character", character, "--quiet"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        sec = time.perf_counter() - t
        rows = Dataset(tmp).index_rows()
        steps = sum(r["steps"] for r in rows)
        out[workers] = {"steps": steps, "seconds": round(sec, 2), "steps_per_s": round(steps / sec, 1),
                        "episode_steps_per_s": round(statistics.median(r["steps"] / r["wall_seconds"] for r in rows), 1)}
    return {"workers_1": out[1], "workers_2": out[2],
            "efficiency_end_to_end": round(out[2]["steps_per_s"] / (2 * out[1]["steps_per_s"]), 3),
            "efficiency_per_episode": round(out[2]["episode_steps_per_s"] / out[1]["episode_steps_per_s"], 3),
            "dataset": tmp}


def storage(root: str) -> dict:
    """Bytes/step on these AutoAscend games: trajdata (all fields, and tty fields) vs NLE's own
    ttyrec.bz2 recording of the same games (replayed from the recorded seeds and actions, every
    frame checked), the format NLD-AA is distributed in."""
    from trajdata.importers.ttyrec import export_ttyrecs

    from trajdata.format.dataset import Dataset
    from trajdata.format.inspect import summarize

    ds = Dataset(root)
    with tempfile.TemporaryDirectory() as d:
        frames = export_ttyrecs(ds, Path(d))
        bz2 = sum(p.stat().st_size for p in Path(d).rglob("*.ttyrec*.bz2"))
    s = summarize(root)
    tty = sum(s["field_bytes_per_step"].get(f, 0) for f in ("tty_chars", "tty_colors", "tty_cursor"))
    return {"steps": s["steps"], "frames_replayed_identical": frames, "codec": ds.info["collection"]["codec"],
            "trajdata_all_fields_bytes_per_step": round(s["bytes_per_step"], 3),
            "trajdata_tty_fields_bytes_per_step": round(tty, 3),
            "nle_ttyrec_bz2_bytes_per_step_tty_only": round(bz2 / frames, 3),
            "all_fields_bytes_vs_nld_tty": round(s["bytes_per_step"] / (bz2 / frames), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--games", type=int, default=5, help="games for the overhead comparison")
    ap.add_argument("--max-steps", type=int, default=4000, help="step cap per game")
    ap.add_argument("--shards", type=int, default=8, help="shards for the parallel-efficiency run")
    ap.add_argument("--parallel-max-steps", type=int, default=12000,
                    help="step cap per game in the parallel run (longer runs amortise process start-up)")
    ap.add_argument("--character", default="val-hum-law-fem")
    args = ap.parse_args()

    from trajdata.collectors.install import installed_path

    result: dict = {"bench": "autoascend", "cpu_count": os.cpu_count()}
    if installed_path() is None:
        result["skipped"] = "AutoAscend is not installed: run `trajdata experts install autoascend`"
    else:
        result["overhead"] = overhead(args.games, args.max_steps, args.character)
        result["parallel"] = parallel(args.shards, args.parallel_max_steps, args.character)
        result["parallel"]["anchor_bare_autoascend"] = bare_parallel(args.games, args.max_steps, args.character)
        result["storage"] = storage(result["parallel"].pop("dataset"))
        result["targets"] = {"overhead_max": 0.05, "parallel_efficiency_min": 0.9}
        result["reference"] = {"design_md_steps_per_s_per_core": 587}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if "skipped" in result:
        print(f"bench_autoascend: skipped: {result['skipped']}", file=sys.stderr)


if __name__ == "__main__":
    main()
