"""RL throughput: env steps/s and learner samples/s per core of `trajdata train rl`, beside the bare
env's random-action steps/s measured in the same run.

1. Bare env, one process: NLE's ``NetHackScore-v0`` as ``gym.make`` gives it (its default
   observations include the costly screen_descriptions), and as `train rl` steps it
   (``trajdata.rl.env.SeededGames``: the Challenge's observations, seeded games, the previous action),
   both with uniformly random actions.
2. Actors only: a TorchRL collector of ``--cores`` actor processes, ``--envs`` games each, acting with
   the agent at ``--params`` (one batched forward per step), nothing learnt: env steps/s.
3. `train rl` itself for ``--seconds``: ``--actors 0`` (acting and learning in one process: one core),
   ``--actors 1`` (one actor process beside the learner: two cores) and ``--actors --cores``; learner
   samples/s (env steps the learner trained on per second) from metrics.jsonl after the first rows;
   with ``--precision fp32,bf16`` each in turn (the learner under bf16 autocast; actors in fp32).
4. Where the time goes: FLOPs per sample of the agent (``measured_flops_per_sample``: the fixed
   encoders included) beside 8N, and the agent's forward (batch ``--envs``, T = 1) and forward +
   backward (``--envs`` x ``--unroll``, fp32 and bf16 autocast) samples/s on one thread.

    python bin/bench_rl.py --out bench-results/rl.json            # ~6 minutes on 2 cores
    python bin/bench_rl.py --encoders paper,cpu --seconds 20 --out bench-results/rl-proxy.json   # both agents
    python bin/bench_rl.py --encoders cpu --precision fp32,bf16 --seconds 20 --out bench-results/rl-bf16.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def bare_env(seconds: float, trajdata_env: bool) -> dict:
    import gymnasium as gym
    import nle  # noqa: F401
    import numpy as np

    from trajdata.rl.env import SeededGames, model_fields

    env = SeededGames("NetHackScore-v0", "mon-hum-neu-mal", model_fields(), 0, (0,)) if trajdata_env \
        else gym.make("NetHackScore-v0")
    rng = np.random.default_rng(0)
    n_actions = int(env.action_space.n)
    env.reset()
    steps = games = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, term, trunc, _ = env.step(int(rng.integers(n_actions)))
        steps += 1
        if term or trunc:
            env.reset()
            games += 1
    dt = time.perf_counter() - t0
    env.close()
    return dict(steps=steps, games=games, seconds=dt, steps_per_s=steps / dt)


def actors_only(cfg, seconds: float) -> dict:
    import torch
    from tensordict.nn import TensorDictModule

    from trajdata.rl.agent import ActorStep, RLAgent
    from trajdata.rl.env import env_actions
    from trajdata.rl.shape import model_config
    from trajdata.rl.train import make_collector

    torch.set_num_threads(1)
    mcfg = model_config(cfg, len(env_actions(cfg.env)))
    step = ActorStep(RLAgent(mcfg))
    collector = make_collector(cfg, TensorDictModule(step, in_keys=step.in_keys(), out_keys=step.out_keys()), mcfg,
                               None, 0)
    frames, t0, first = 0, None, None
    try:
        for td in collector:
            now = time.perf_counter()
            if t0 is None:  # the first batch pays for start-up
                t0, first = now, td.numel()
                continue
            frames += td.numel()
            if now - t0 >= seconds:
                break
    finally:
        collector.shutdown()
    dt = time.perf_counter() - t0
    return dict(actors=cfg.actors, envs=cfg.envs, steps=frames, seconds=dt, steps_per_s=frames / dt,
                steps_per_s_per_core=frames / dt / max(cfg.actors, 1))


def train_rate(cfg, seconds: float, est_rate: float, cores: int) -> dict:
    from dataclasses import replace

    from trajdata.rl.train import train

    per_step = cfg.envs * cfg.unroll
    steps = max(4, int(est_rate * seconds / per_step)) * per_step
    t0 = time.perf_counter()
    r = train(replace(cfg, steps=steps, log_every=1))
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    a, b = rows[min(2, len(rows) - 2)], rows[-1]  # the first rows pay for start-up
    rate = (b["samples"] - a["samples"]) / (b["wall_seconds"] - a["wall_seconds"])
    return dict(actors=cfg.actors, cores=cores, learner_steps=r["step"], samples=r["samples"], wall_seconds=wall,
                learner_samples_per_s=rate, learner_samples_per_s_per_core=rate / cores,
                log_rho=b["log_rho"])


def model_costs(cfg) -> dict:
    import torch

    from trajdata.models.flops import measured_flops_per_sample
    from trajdata.models.nethack import random_batch
    from trajdata.rl.agent import RLAgent
    from trajdata.rl.env import env_actions
    from trajdata.rl.shape import effective_params, model_config

    torch.set_num_threads(1)
    mcfg = model_config(cfg, len(env_actions(cfg.env)))
    agent = RLAgent(mcfg)
    policy = agent.policy
    fwd = measured_flops_per_sample(policy, 1, cfg.envs, backward=False)
    train = measured_flops_per_sample(policy, cfg.unroll, cfg.envs)
    E, T = cfg.envs, cfg.unroll

    def rate(batch, grad: bool, reps: int = 3, bf16: bool = False) -> float:
        n = batch["tty_chars"].shape[0] * batch["tty_chars"].shape[1]
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, values, _ = agent.unroll(batch, batch["action"].long() % mcfg.n_actions, batch["reset"],
                                                 agent.initial_hidden(batch["reset"].shape[0]))
                if grad:
                    (logits.float().sum() + values.float().sum()).backward()
            best = min(best, time.perf_counter() - t)
        return n / best

    n = effective_params(mcfg)
    return dict(params=n, width=mcfg.width, layers=mcfg.layers, flops_8n=8 * n,
                flops_per_sample_forward=fwd, flops_per_sample_train=train,
                flops_per_step_measured=fwd + train, encoder_share=1 - 8 * n / (fwd + train),
                actor_forward_samples_per_s=rate(random_batch(mcfg, E, 1), False),
                learner_fwd_bwd_samples_per_s=rate(random_batch(mcfg, E, T), True),
                learner_fwd_bwd_samples_per_s_bf16=rate(random_batch(mcfg, E, T), True, bf16=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", default="100k")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--unroll", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=40.0, help="per measurement")
    ap.add_argument("--device", default="cpu", help="the learner's device (actors act on the CPU)")
    ap.add_argument("--precision", default="fp32",
                    help="comma-separated: the learner's fp32 and/or bf16 (train rl --precision), measured in turn")
    ap.add_argument("--encoders", default="paper",
                    help="comma-separated: paper and/or cpu (the CPU proxy, train rl --encoders cpu), measured in turn")
    args = ap.parse_args()
    from trajdata.rl.config import RLConfig

    load0 = os.getloadavg()
    res = dict(cpu_count=os.cpu_count(), cores=args.cores, params=args.params, envs=args.envs, unroll=args.unroll,
               seconds=args.seconds, device=args.device)
    res["bare_env_gym_make"] = bare_env(args.seconds / 2, trajdata_env=False)
    res["bare_env"] = bare_env(args.seconds / 2, trajdata_env=True)
    print("bare env", json.dumps(res["bare_env_gym_make"]), json.dumps(res["bare_env"]), flush=True)
    bare = res["bare_env"]["steps_per_s"]
    res["summary"] = dict(bare_env_steps_per_s_per_core=bare, bare_env_steps_per_s_on_cores=bare * args.cores,
                          goal=f"learner data rate >= 50% of the bare env's on {args.cores} cores at N = {args.params}")
    for enc in args.encoders.split(","):
        key = "" if enc == "paper" else f"_{enc}"  # the paper's encoders keep the keys they always had
        with tempfile.TemporaryDirectory() as tmp:
            def cfg(name: str, actors: int, precision: str = "fp32") -> RLConfig:
                return RLConfig(out=str(Path(tmp) / name), params=args.params, envs=args.envs, unroll=args.unroll,
                                actors=actors, progress=False, tensorboard=False, checkpoint_every=10**9,
                                device=args.device, encoders=enc, precision=precision)

            res[f"model{key}"] = model = model_costs(cfg("m", 0))
            print(f"model ({enc})", json.dumps(model), flush=True)
            res[f"actors_only{key}"] = r = actors_only(cfg("a", args.cores), args.seconds)
            print(f"actors only ({enc})", json.dumps(r), flush=True)
            est = model["learner_fwd_bwd_samples_per_s"] / 2
            for precision in args.precision.split(","):
                pkey = "" if precision == "fp32" else f"_{precision}"  # fp32 keeps the keys it always had
                res[f"train{key}{pkey}"] = trains = []
                for actors, cores in ((0, 1), (1, 2), (args.cores, args.cores)):
                    r = train_rate(cfg(f"t{actors}{pkey}", actors, precision), args.seconds, est * cores, cores)
                    trains.append(dict(r, precision=precision))
                    print(f"train ({enc}, {precision})", json.dumps(r), flush=True)
                best = max(trains, key=lambda r: r["learner_samples_per_s"])
                res["summary"][f"encoders_{enc}{pkey}"] = dict(
                    best_train=dict(actors=best["actors"], cores=best["cores"]),
                    learner_samples_per_s=best["learner_samples_per_s"],
                    one_core_learner_samples_per_s=trains[0]["learner_samples_per_s"],
                    learner_to_bare_env_on_cores=best["learner_samples_per_s"] / (bare * args.cores))
    res["load_average"] = dict(start=load0, end=os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
