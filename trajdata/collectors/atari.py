"""The Atari PPO expert: an SB3 PPO policy (a `trajdata train ppo` run or any SB3 zip) playing full
games in `trajdata.envs.atari.make_play_env` through the collection runner."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from trajdata.collectors.base import Expert
from trajdata.envs.atari import (FRAME_SKIP, FRAME_STACK, GAMES, NOOP_MAX, SCREEN_SIZE, AtariPlayer, env_id, has_fire,
                                 lives, make_play_env, resolve_game)
from trajdata.errors import ConfigError, ExpertError


def load_policy(path: str | os.PathLike, device: str = "cpu"):
    """The policy of an SB3 PPO zip (a run directory works too: its model.zip)."""
    from stable_baselines3 import PPO

    p = model_file(path)
    if not p.is_file():
        raise ExpertError(f"PPO model not found: {p}")
    zero = lambda _: 0.0  # noqa: E731  (schedules are not needed to act; rl-zoo zips pickle theirs)
    try:
        model = PPO.load(p, device=device, custom_objects={"learning_rate": 0.0, "lr_schedule": zero, "clip_range": zero})
    except Exception as e:  # a corrupt zip or another algorithm's file
        raise ExpertError(f"cannot load PPO model {p}: {type(e).__name__}: {e}") from e
    model.policy.set_training_mode(False)
    return model.policy


def model_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / "model.zip" if p.is_dir() else p


def model_config(path: str | os.PathLike) -> dict:
    """The config.json `trajdata train ppo` saved beside the model ({} for a bare SB3/rl-zoo zip)."""
    f = model_file(path).parent / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


class AtariGame(Expert):
    """Full games of ``game`` in ``make_play_env`` (real score, all lives): the Atari env plumbing of
    the PPO expert and of evaluation's host; a subclass chooses the actions."""

    schema = "atari"

    def __init__(self, game: str, noop_max: int = NOOP_MAX, frame_skip: int = FRAME_SKIP):
        self.game, self.noop_max, self.frame_skip = resolve_game(game), noop_max, frame_skip
        self.env = None

    def make_env(self):
        self.env = make_play_env(self.game, self.noop_max, self.frame_skip)
        return self.env

    def reset_env(self, env, seed: int):
        obs, info = env.reset(seed=seed)
        return obs, info, {"seed": seed}

    def step_fields(self, obs, info: dict) -> dict[str, np.ndarray]:
        return {"frame": obs[:, :, 0], "lives": np.uint8(lives(self.env))}

    def summary(self, env) -> dict:
        return {"score": env.episode_return, "game": self.game, "lives_left": lives(self.env)}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


class PPOExpert(AtariGame):
    """An SB3 PPO Atari policy playing full games (real score, all lives) in `make_play_env`."""

    name = "ppo"
    version = "2"  # 2: frames stacked by the life rule of trajdata.envs.atari (1: zeros after the reset actions)

    def __init__(self, model: str, game: str | None = None, deterministic: bool = False):
        self.model = model_file(model)
        if not self.model.is_file():
            raise ExpertError(f"PPO model not found: {self.model}")
        cfg = model_config(self.model)
        if game is None and "game" not in cfg:
            raise ConfigError(f"{self.model} has no config.json naming its game: pass --game ({', '.join(GAMES)})")
        super().__init__(game or cfg["game"], cfg.get("noop_max", NOOP_MAX), cfg.get("frame_skip", FRAME_SKIP))
        if "game" in cfg and resolve_game(cfg["game"]) != self.game:
            raise ConfigError(f"{self.model} was trained on {cfg['game']}, not {self.game}")
        if cfg.get("screen_size", SCREEN_SIZE) != SCREEN_SIZE or cfg.get("frame_stack", FRAME_STACK) != FRAME_STACK:
            raise ExpertError(f"{self.model}: only {SCREEN_SIZE}x{SCREEN_SIZE} frames stacked {FRAME_STACK} are supported")
        self.deterministic = deterministic
        self.sha256 = hashlib.sha256(self.model.read_bytes()).hexdigest()

    def make_env(self):
        import torch

        torch.set_num_threads(1)
        env = super().make_env()
        self.player = AtariPlayer(load_policy(self.model), env.action_space.n, has_fire(env), self.deterministic)
        return env

    def begin(self, obs, seed: int) -> None:
        self.player.begin(lives(self.env), seed)

    def act(self, obs) -> int:
        return self.player.act(obs, lives(self.env))

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "env": env_id(self.game), "game": self.game,
                "model_sha256": self.sha256, "model_file": self.model.name, "deterministic": self.deterministic,
                "noop_max": self.noop_max, "frame_skip": self.frame_skip, "screen_size": SCREEN_SIZE,
                "policy_frame_stack": FRAME_STACK, "reward": "unclipped", "episode": "full game"}
