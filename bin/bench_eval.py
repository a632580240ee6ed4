"""Evaluation benchmark: env steps/s per core of `trajdata eval`, batched BC inference vs batch 1, NetHack and Atari.

1. Data: a few scripted NetHack games and, for Atari, a tiny SB3 PPO Breakout expert's games (the
   checkpoints' dataset records name the env the eval plays; the data is not trained on).
2. Checkpoints: freshly initialised BC models in the file layout `train bc` writes (a NetHack
   Transformer (``--width``, ``--layers``, KV cache over ``--context`` steps) and the Atari CNN
   (``--atari-width``)): throughput does not depend on what the weights learnt.
3. For each policy (bc, and random as the env-only anchor) and each lane count E (1 and ``--envs``):
   one worker, one torch thread, plays one default unit of work (2E episodes, E side by side, one
   batched forward per step; a lane takes the next episode when its own ends) up to ``--max-steps``
   steps each, through the eval rollout code (``run_unit``; envs made and policy loaded in an untimed
   warm-up unit first). Seeded resets are timed too (ALE reloads the ROM at each: ~0.1 s). Reported:
   env steps, wall seconds (the fastest of ``--repeat``), env steps/s (= per core) and, for bc, the
   batched/batch-1 speed-up and the ratio to the random policy.

    python bin/bench_eval.py --out bench-results/eval.json        # CPU, a few minutes
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


def collect_nethack(out: Path) -> Path:
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect

    collect(CollectConfig(out=str(out), expert=ExpertSpec("trajdata.collectors.nethack:ScriptedExpert"), shards=1,
                          episodes_per_shard=1, max_steps=200, workers=1, seed=1), progress=False)
    return out


def collect_atari(out: Path) -> Path:
    from trajdata.collectors.runner import CollectConfig, ExpertSpec, collect
    from trajdata.train.ppo import PPOConfig, train_ppo

    expert = out.parent / "ppo"
    train_ppo(PPOConfig(game="Breakout", timesteps=128, n_envs=2, n_steps=32, batch_size=64, checkpoint_every=64,
                        eval_episodes=0), expert, progress=False)
    spec = ExpertSpec("trajdata.collectors.atari:PPOExpert", {"model": str(expert), "game": "Breakout"})
    collect(CollectConfig(out=str(out), expert=spec, shards=1, episodes_per_shard=1, workers=1, max_steps=500),
            progress=False)
    return out


def init_checkpoint(dataset: Path, path: Path, **size) -> Path:
    """A freshly initialised BC checkpoint for ``dataset`` (what `train bc` writes, at step 0)."""
    import torch

    from trajdata.format.dataset import Dataset
    from trajdata.train import checkpoint as ckpt_io
    from trajdata.train.bc import BCConfig, dataset_family, dataset_record, model_config

    ds = Dataset(dataset)
    cfg = BCConfig(dataset=str(dataset), out=str(path.parent), **size)
    family = dataset_family(ds)
    mcfg = model_config(cfg, family, ds)
    torch.manual_seed(0)
    model = ckpt_io.build_model(family, asdict(mcfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.save(path, dict(ckpt_io.model_record(model), dataset=dataset_record(ds, cfg, mcfg), train=asdict(cfg),
                            step=0, samples=0, flops=0.0, params=0, budget=None))
    return path


def measure(ckpt: Path, expert: str | None, lanes: int, max_steps: int, seed: int, repeat: int) -> dict:
    """Env steps/s of one worker (one torch thread) playing a default unit (2 x ``lanes`` episodes,
    ``lanes`` side by side): the best of ``repeat`` timings of the same episodes."""
    import torch

    from trajdata.evaluate import EvalConfig
    from trajdata.evaluate.rollout import UnitSpec, release, run_unit
    from trajdata.evaluate.runner import eval_seeds, plan

    job = plan(str(ckpt), EvalConfig(episodes=lanes, envs=lanes, expert=expert, out=str(ckpt.parent / "eval")))[0]
    n = 2 * lanes
    seeds = list(enumerate(eval_seeds(seed, n + lanes)))
    torch.set_num_threads(1)
    walls = []
    try:
        run_unit(UnitSpec(job.host, job.policy, tuple(seeds[n:]), lanes, 5, threads=1))  # warm-up: envs, model
        for _ in range(repeat):
            t0 = time.perf_counter()
            results = run_unit(UnitSpec(job.host, job.policy, tuple(seeds[:n]), lanes, max_steps, threads=1))
            walls.append(time.perf_counter() - t0)
    finally:
        release()
    steps = sum(r["steps"] for r in results)
    wall = min(walls)
    return dict(envs=lanes, episodes=len(results), steps=steps, wall_s=round(wall, 3),
                walls_s=[round(w, 3) for w in walls], steps_per_s=round(steps / wall, 1), mean_episode_steps=round(steps / len(results), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file to write (required)")
    ap.add_argument("--envs", type=int, default=8, help="lanes E of the batched runs (vs 1)")
    ap.add_argument("--max-steps", type=int, default=1000, help="step cap per episode")
    ap.add_argument("--width", type=int, default=128, help="NetHack Transformer width h")
    ap.add_argument("--layers", type=int, default=2, help="NetHack Transformer layers L")
    ap.add_argument("--context", type=int, default=64, help="NetHack Transformer context (training seq_len)")
    ap.add_argument("--atari-width", type=int, default=34, help="Atari CNN width w")
    ap.add_argument("--families", default="nethack,atari", help="comma-separated: nethack, atari")
    ap.add_argument("--seed", type=int, default=0, help="first eval seed")
    ap.add_argument("--repeat", type=int, default=2, help="timings of each run (the fastest is reported)")
    ap.add_argument("--data", default=None, help="directory for the collected data (reused if there) [temp]")
    a = ap.parse_args()
    if not a.out:
        ap.error("--out is required")
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    for f in families:
        if f not in ("nethack", "atari"):
            ap.error(f"--families: {f!r} is neither nethack nor atari")
    if a.envs < 2 or a.max_steps < 1 or a.repeat < 1:
        ap.error("--envs must be at least 2, --max-steps and --repeat at least 1")
    tmp = Path(a.data or tempfile.mkdtemp(prefix="bench-eval-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = dict(cpu_count=os.cpu_count(), torch_threads=1, workers=1, envs=a.envs, max_steps=a.max_steps,
                  repeat=a.repeat)
    sizes = {"nethack": dict(width=a.width, layers=a.layers, seq_len=a.context),
             "atari": dict(width=a.atari_width, seq_len=a.context)}
    for family in families:
        data = tmp / family
        if not (data / "index.parquet").exists():
            print(f"collecting {family} data in {data}", flush=True)
            (collect_nethack if family == "nethack" else collect_atari)(data)
        ckpt = init_checkpoint(data, tmp / f"run-{family}" / "checkpoint.pt", **sizes[family])
        res = result[family] = dict(model=sizes[family])
        for policy, expert in (("bc", None), ("random", "random")):
            res[policy] = {}
            for lanes in (1, a.envs):
                r = measure(ckpt, expert, lanes, a.max_steps, a.seed, a.repeat)
                res[policy][f"E{lanes}"] = r
                print(f"{family} {policy:<6} E={lanes:<3} {r['steps']:>6} steps {r['wall_s']:>7.2f} s "
                      f"{r['steps_per_s']:>8.1f} steps/s", flush=True)
        res["bc_batched_speedup"] = round(res["bc"][f"E{a.envs}"]["steps_per_s"] / res["bc"]["E1"]["steps_per_s"], 2)
        res["bc_vs_random_E1"] = round(res["bc"]["E1"]["steps_per_s"] / res["random"]["E1"]["steps_per_s"], 3)
        res[f"bc_vs_random_E{a.envs}"] = round(res["bc"][f"E{a.envs}"]["steps_per_s"]
                                               / res["random"][f"E{a.envs}"]["steps_per_s"], 3)
    result["total_s"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
