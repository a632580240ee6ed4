"""Train an Atari PPO expert with SB3 (rl-zoo's Atari settings), resumably.

    from trajdata.train.ppo import PPOConfig, train_ppo
    train_ppo(PPOConfig(game="Breakout", timesteps=1_000_000, n_envs=4), "runs/breakout")

The output directory holds config.json, checkpoints/ckpt_<steps>.zip (the newest two), progress.csv,
model.zip and eval.json. Running again with the same config continues from the newest checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trajdata import config
from trajdata.config import at_least, coerce_fields, open_run_dir, option, require
from trajdata.envs.atari import (FRAME_SKIP, FRAME_STACK, GAMES, NOOP_MAX, SCREEN_SIZE, env_id, evaluate,
                                 register_ale, resolve_game)


@dataclass
class PPOConfig:
    """Every setting of a PPO expert run (the flags of `train ppo`)."""

    game: str = option("Breakout", f"One of the paper's 8 games: {', '.join(GAMES)}.", required=True)
    timesteps: int = option(10_000_000, "Agent steps over all envs (10M, 500k, 1e6; x4 raw frames).", count=True)
    n_envs: int = option(8, "Parallel environments.", flag="envs")
    seed: int = option(0, "Seed of the envs and the policy.")
    n_steps: int = option(128, "Steps per env per rollout.")
    n_epochs: int = option(4, "Epochs over each rollout.")
    batch_size: int = option(256, "Minibatch size (divides n_steps x envs).")
    learning_rate: float = option(2.5e-4, "Initial learning rate (decays linearly to 0).")
    clip_range: float = option(0.1, "Initial clip range (decays linearly to 0).")
    ent_coef: float = option(0.01, "Entropy coefficient.")
    vf_coef: float = option(0.5, "Value-function coefficient.")
    gamma: float = option(0.99, "Discount.")
    gae_lambda: float = option(0.95, "GAE lambda.")
    max_grad_norm: float = option(0.5, "Max gradient norm.")
    noop_max: int = option(NOOP_MAX, "Random no-ops at an episode's start.")
    frame_skip: int = option(FRAME_SKIP, "Frames per agent step (max-pooled over the last two).")
    screen_size: int = option(SCREEN_SIZE, "Side of the gray frame the policy sees.")
    frame_stack: int = option(FRAME_STACK, "Frames stacked per observation.")
    subproc: bool = option(False, "Step the envs in subprocesses (worth it with many free cores).")
    threads: int = option(1, "torch CPU threads.")
    checkpoint_every: int = option(100_000, "Timesteps between checkpoints.", count=True)
    eval_episodes: int = option(10, "Full games scored at the end (0: skip).")
    eval_seed: int = option(1_000_000, "First seed of the final evaluation's games.")
    eval_deterministic: bool = option(False, "Greedy actions in the final evaluation.")

    def __post_init__(self):
        coerce_fields(self)
        self.game = resolve_game(self.game)
        at_least(self, 1, "timesteps", "n_envs", "n_steps", "n_epochs", "batch_size", "checkpoint_every", "threads")
        at_least(self, 0, "eval_episodes")
        require((self.n_steps * self.n_envs) % self.batch_size == 0, "batch_size",
                f"({self.batch_size}) must divide n_steps*n_envs ({self.n_steps * self.n_envs})")

    @property
    def env_id(self) -> str:
        return env_id(self.game)


_RESUME_FREE = {"timesteps", "subproc", "threads", "checkpoint_every", "eval_episodes", "eval_seed", "eval_deterministic"}


def parse_count(text: str | int) -> int:
    """'10M', '500k', '1e6', '2.5M', '1_000_000' -> int."""
    return config.parse_count(text)


def make_train_env(cfg: PPOConfig):
    """cfg.n_envs AtariWrapper envs (clipped rewards, life loss ends an episode), frame-stacked."""
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecFrameStack

    register_ale()
    env = make_atari_env(
        cfg.env_id, n_envs=cfg.n_envs, seed=cfg.seed,
        vec_env_cls=SubprocVecEnv if cfg.subproc else DummyVecEnv,
        wrapper_kwargs=dict(noop_max=cfg.noop_max, frame_skip=cfg.frame_skip, screen_size=cfg.screen_size),
    )
    return VecFrameStack(env, n_stack=cfg.frame_stack)


def _ckpts(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("ckpt_*.zip"))


def _save_atomic(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def _callback(cfg: PPOConfig, out: Path, start_steps: int, progress: bool):
    import numpy as np
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    class Progress(BaseCallback):
        def _on_training_start(self):
            self.bar = tqdm(total=cfg.timesteps, initial=start_steps, desc=f"ppo {cfg.game}", unit="step",
                            unit_scale=True, disable=not progress, smoothing=0.05)
            self.t0, self.last = time.time(), start_steps
            self.next_ckpt = (start_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every
            new = not (out / "progress.csv").exists()
            self.csv = open(out / "progress.csv", "a", newline="")
            self.w = csv.writer(self.csv)
            if new:
                self.w.writerow(["timesteps", "wall_s", "steps_per_s", "mean_return_100", "episodes"])

        def _on_step(self):
            self.bar.update(self.num_timesteps - self.last)
            self.last = self.num_timesteps
            if self.num_timesteps >= self.next_ckpt:
                _save_atomic(self.model, out / "checkpoints" / f"ckpt_{self.num_timesteps:012d}.zip")
                for old in _ckpts(out)[:-2]:
                    old.unlink()
                self.next_ckpt += cfg.checkpoint_every
            return True

        def _on_rollout_end(self):
            eps = [e["r"] for e in self.model.ep_info_buffer]
            mean = float(np.mean(eps)) if eps else float("nan")
            dt = time.time() - self.t0
            self.w.writerow([self.num_timesteps, round(dt, 1), round((self.num_timesteps - start_steps) / max(dt, 1e-9), 1),
                             round(mean, 2), len(eps)])
            self.csv.flush()
            if eps:
                self.bar.set_postfix(ret=f"{mean:.1f}")

        def _on_training_end(self):
            self.bar.close()
            self.csv.close()

    return Progress()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def train_ppo(cfg: PPOConfig, out: str | os.PathLike, progress: bool = True) -> dict:
    """Train (or continue) into `out`; returns the evaluation dict (also written to out/eval.json)."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.utils import LinearSchedule

    torch.set_num_threads(cfg.threads)
    out = Path(out)
    open_run_dir(out, dataclasses.asdict(cfg) | {"env_id": cfg.env_id}, _RESUME_FREE)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if (out / "model.zip").exists() and (out / "eval.json").exists():
        done = json.loads((out / "eval.json").read_text())
        if done.get("timesteps", 0) >= cfg.timesteps:
            return done

    env = make_train_env(cfg)
    ckpts = _ckpts(out)
    if ckpts:
        model = PPO.load(ckpts[-1], env=env, device="cpu")
    else:
        model = PPO(
            "CnnPolicy", env, n_steps=cfg.n_steps, n_epochs=cfg.n_epochs, batch_size=cfg.batch_size,
            learning_rate=LinearSchedule(cfg.learning_rate, 0.0, 1.0), clip_range=LinearSchedule(cfg.clip_range, 0.0, 1.0),
            ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
            max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, device="cpu", verbose=0,
        )
    model.set_logger(configure(str(out), []))  # no SB3 log files: progress.csv is ours (and no /tmp/SB3-* litter)
    start = model.num_timesteps
    t0 = time.time()
    if start < cfg.timesteps:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _interrupt) if main else None
        try:
            # reset_num_timesteps=False: SB3 sets its schedule total to start + remaining = cfg.timesteps
            model.learn(cfg.timesteps - start, callback=_callback(cfg, out, start, progress),
                        reset_num_timesteps=False, progress_bar=False)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the progress for the next run
            _save_atomic(model, out / "checkpoints" / f"ckpt_{model.num_timesteps:012d}.zip")
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)
    train_s = time.time() - t0
    env.close()
    _save_atomic(model, out / "model.zip")
    result = {"timesteps": int(model.num_timesteps), "train_wall_s_this_run": round(train_s, 1)}
    if cfg.eval_episodes:
        result |= evaluate(model.policy, cfg.game, cfg.eval_episodes, cfg.eval_seed, cfg.eval_deterministic,
                           progress=progress)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result
