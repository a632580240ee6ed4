"""Atari collection benchmark: steps/s/core and bytes/step, ours vs anchors, in one run.

Anchors: the bare preprocessed ALE env under random actions (the ceiling for any collector) and,
for storage, the raw arrays (84*84 frame + action, reward, done, lives) and np.savez_compressed.
Ours: `trajdata.collectors.runner.collect` with the PPO expert (policy forward + recording +
zstd shards), one worker in-process. "per core" figures divide by CPU seconds of this process,
which is robust to other jobs sharing the machine; wall-clock rates are printed beside them.

    python bin/bench_atari.py --out bench-results/atari.json [--model RUN_DIR] [--episodes 8]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def anchor_env(game: str, steps: int) -> dict:
    from trajdata.envs.atari import make_play_env

    env = make_play_env(game)
    rng = np.random.default_rng(0)
    env.reset(seed=0)

    def run():
        for _ in range(steps):
            _, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
            if term or trunc:
                env.reset()

    _, wall, cpu = _timed(run)
    env.close()
    return {"steps": steps, "steps_per_s_wall": round(steps / wall, 1), "steps_per_cpu_s": round(steps / cpu, 1),
            "raw_frames_per_cpu_s": round(4 * steps / cpu, 1)}


def policy_forward(model: Path, steps: int) -> dict:
    import torch

    from trajdata.collectors.atari import load_policy

    policy = load_policy(model)
    obs = torch.as_tensor(np.random.default_rng(0).integers(0, 255, (1, 4, 84, 84), dtype=np.uint8))

    def run():
        with torch.no_grad():
            for _ in range(steps):
                policy._predict(obs, deterministic=False)

    _, wall, cpu = _timed(run)
    return {"steps": steps, "steps_per_cpu_s": round(steps / cpu, 1)}


def tiny_model(game: str, dir: Path) -> Path:
    from trajdata.train.ppo import PPOConfig, train_ppo

    train_ppo(PPOConfig(game=game, timesteps=64, n_envs=1, n_steps=64, batch_size=64, eval_episodes=0), dir, progress=False)
    return dir


def ours(model: Path, game: str, episodes: int, out: Path) -> dict:
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
    from trajdata.format.dataset import Dataset

    spec = ExpertSpec("trajdata.collectors.atari:PPOExpert", {"model": str(model), "game": game})
    cfg = CollectConfig(out=str(out), expert=spec, shards=1, episodes_per_shard=episodes, workers=1, max_steps=27_000)
    r, wall, cpu = _timed(lambda: collect(cfg, progress=False))
    ds = Dataset(out)
    rows = ds.index_rows()
    steps = sum(x["steps"] for x in rows)
    shard_bytes = sum(p.stat().st_size for p in ds.shard_paths())
    chunks = [c for p in ds.shard_paths() for c in ds.shard(p.name).chunks()]
    arrays = {k: np.concatenate([c.fields[k] for c in chunks]) for k in ds.schema.names}
    raw = sum(a.nbytes for a in arrays.values())
    buf = io.BytesIO()
    t = time.perf_counter()
    np.savez_compressed(buf, **arrays)
    npz_s = time.perf_counter() - t
    dec = _timed(lambda: [c for p in ds.shard_paths() for c in ds.shard(p.name).chunks()])
    return {
        "episodes": len(rows), "steps": steps, "mean_return": round(float(np.mean([x["return"] for x in rows])), 2),
        "steps_per_s_wall": round(steps / wall, 1), "steps_per_cpu_s": round(steps / cpu, 1),
        "bytes_per_step": round(shard_bytes / steps, 1), "raw_bytes_per_step": round(raw / steps, 1),
        "npz_compressed_bytes_per_step": round(buf.tell() / steps, 1), "npz_compress_s": round(npz_s, 2),
        "decode_steps_per_cpu_s": round(steps / dec[2], 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--game", default="Breakout")
    ap.add_argument("--model", default=None, help="PPO run dir or zip (default: an untrained tiny model)")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--anchor-steps", type=int, default=3000)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(a.model) if a.model else tiny_model(a.game, Path(tmp) / "model")
        res = {"game": a.game, "model": str(a.model or "untrained"), "loadavg_1m_start": round(os.getloadavg()[0], 2),
               "anchor_env_random": anchor_env(a.game, a.anchor_steps),
               "anchor_policy_forward_only": policy_forward(model, a.anchor_steps),
               "ours_collect_ppo": ours(model, a.game, a.episodes, Path(tmp) / "ds")}
    res["collect_vs_env_ceiling"] = round(res["ours_collect_ppo"]["steps_per_cpu_s"] / res["anchor_env_random"]["steps_per_cpu_s"], 3)
    res["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
