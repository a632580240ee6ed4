"""Atari PPO experts: the ALE env with the preprocessing a model was trained on, and a player for it.

Training (`trajdata.train.ppo`) uses SB3's AtariWrapper: no-op reset (1..30 raw no-ops), frame-skip 4
with a max over the last two raw frames, 84x84 gray, FIRE on reset, terminal on life loss, clipped
rewards, and a 4-frame stack that restarts (zeros + newest frame) at every such reset.

Collection plays full games with the real game reward. `make_play_env` is the same wrapper chain
without reward clipping and without terminal-on-life-loss; `AtariPlayer` reproduces what training
did on a life loss by emitting the reset actions itself (NOOP, FIRE, 2, as SB3's EpisodicLifeEnv +
FireResetEnv do) and restarting its frame stack. Those actions are ordinary recorded steps, so a
recorded episode is fully determined by its seed (which fixes the no-op count in `reset`) and its
actions: every recorded frame is the newest single frame of the stack the action was chosen on.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from trajdata.collectors.base import Expert
from trajdata.errors import ConfigError, ExpertError

GAMES = ("BattleZone", "Qbert", "NameThisGame", "Phoenix", "SpaceInvaders", "BankHeist", "Boxing", "Breakout")
NOOP_MAX = 30
FRAME_SKIP = 4
SCREEN_SIZE = 84
FRAME_STACK = 4


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_game(game: str) -> str:
    """Canonical name of one of the paper's 8 games ('breakout', 'Q*bert', 'BreakoutNoFrameskip-v4' work)."""
    k = _key(re.sub(r"(?i)noframeskip-v4$|-v[045]$|^ale/", "", game.strip()))
    for g in GAMES:
        if _key(g) == k:
            return g
    raise ConfigError(f"unknown game {game!r}; valid games: {', '.join(GAMES)}")


def env_id(game: str) -> str:
    """Gymnasium id of the raw ALE env: v4 NoFrameskip (no sticky actions, 108k-frame cap), as rl-zoo uses."""
    return f"{resolve_game(game)}NoFrameskip-v4"


def register_ale() -> None:
    import gymnasium
    import ale_py

    gymnasium.register_envs(ale_py)


def make_play_env(game: str, noop_max: int = NOOP_MAX, frame_skip: int = FRAME_SKIP, screen_size: int = SCREEN_SIZE):
    """Full-game env with real rewards: gray `screen_size`^2 frames of shape (H, W, 1), `frame_skip` per step."""
    import gymnasium
    from stable_baselines3.common.atari_wrappers import FireResetEnv, MaxAndSkipEnv, NoopResetEnv, WarpFrame

    register_ale()
    env = gymnasium.make(env_id(game))
    if noop_max > 0:
        env = NoopResetEnv(env, noop_max=noop_max)
    if frame_skip > 1:
        env = MaxAndSkipEnv(env, skip=frame_skip)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    return WarpFrame(env, width=screen_size, height=screen_size)


def lives(env) -> int:
    return int(env.unwrapped.ale.lives())


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


class AtariPlayer:
    """Picks actions for `make_play_env` frames as the policy saw them in training (see module docstring).

    `policy=None` plays uniformly random actions (the random baseline).
    """

    def __init__(self, policy, n_actions: int, fire: bool, deterministic: bool = False, stack: int = FRAME_STACK):
        self.policy, self.n_actions, self.deterministic = policy, n_actions, deterministic
        self.reset_actions = [0, 1, 2] if fire else [0]
        self.stack = np.zeros((stack, SCREEN_SIZE, SCREEN_SIZE), np.uint8)
        if policy is not None:
            shape = tuple(policy.observation_space.shape)
            if shape != self.stack.shape:
                raise ExpertError(f"model expects observations of shape {shape}, Atari frames stack to {self.stack.shape}")
            if policy.action_space.n != n_actions:
                raise ExpertError(f"model has {policy.action_space.n} actions, the game has {n_actions}")

    def begin(self, lives: int, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.lives, self.queue, self.restart = lives, [], True

    def _push(self, frame: np.ndarray) -> None:
        if self.restart:
            self.stack[:] = 0
            self.restart = False
        else:
            self.stack[:-1] = self.stack[1:]
        self.stack[-1] = frame.reshape(self.stack.shape[1:])

    def act(self, frame: np.ndarray, lives: int) -> int:
        """Action for `frame`, every frame of the game from the first; `lives` is the count shown with it."""
        if 0 < lives < self.lives and not self.queue:
            self.queue = list(self.reset_actions)
        self.lives = lives
        if self.queue:
            self.restart = True  # the frame after the reset actions starts a new stack
            return self.queue.pop(0)
        self._push(frame)
        if self.policy is None:
            return int(self.rng.integers(self.n_actions))
        import torch

        with torch.no_grad():
            obs = torch.as_tensor(self.stack[None], device=self.policy.device)
            return int(self.policy._predict(obs, deterministic=self.deterministic)[0])


def play_episode(env, player: AtariPlayer, seed: int, max_steps: int | None = None) -> tuple[float, int]:
    """One full game; returns (real game score, agent steps)."""
    frame, _ = env.reset(seed=seed)
    player.begin(lives(env), seed)
    ret, n = 0.0, 0
    while True:
        frame, r, term, trunc, _ = env.step(player.act(frame, lives(env)))
        ret, n = ret + float(r), n + 1
        if term or trunc or (max_steps is not None and n >= max_steps):
            return ret, n


def evaluate(policy, game: str, episodes: int, seed: int, deterministic: bool = False,
             max_steps: int | None = None, progress: bool = True) -> dict:
    """Mean ± standard error of the real game score over `episodes` full games (policy None: random)."""
    from tqdm import tqdm

    env = make_play_env(game)
    fire = "FIRE" in env.unwrapped.get_action_meanings()
    player = AtariPlayer(policy, env.action_space.n, fire, deterministic)
    returns, lengths = [], []
    for i in tqdm(range(episodes), desc=f"eval {game}", unit="ep", disable=not progress):
        r, n = play_episode(env, player, seed + i, max_steps)
        returns.append(r)
        lengths.append(n)
    env.close()
    x = np.asarray(returns, float)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"game": game, "episodes": episodes, "seed": seed, "deterministic": deterministic,
            "mean_return": float(x.mean()), "se_return": se, "returns": returns, "lengths": lengths}


def model_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / "model.zip" if p.is_dir() else p


def model_config(path: str | os.PathLike) -> dict:
    """The config.json `trajdata train ppo` saved beside the model ({} for a bare SB3/rl-zoo zip)."""
    f = model_file(path).parent / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def replay(game: str, seed: int, actions, noop_max: int = NOOP_MAX, frame_skip: int = FRAME_SKIP):
    """Re-play recorded `actions` from `seed`: yields (frame, lives, reward, done) per action, as recorded."""
    env = make_play_env(game, noop_max, frame_skip)
    frame, _ = env.reset(seed=seed)
    try:
        for a in actions:
            n = lives(env)
            nxt, r, term, trunc, _ = env.step(int(a))
            yield frame[:, :, 0], n, float(r), bool(term or trunc)
            frame = nxt
    finally:
        env.close()


class PPOExpert(Expert):
    """An SB3 PPO Atari policy playing full games (real score, all lives) in `make_play_env`."""

    name = "ppo"
    version = "1"
    schema = "atari"

    def __init__(self, model: str, game: str | None = None, deterministic: bool = False):
        self.model = model_file(model)
        if not self.model.is_file():
            raise ExpertError(f"PPO model not found: {self.model}")
        cfg = model_config(self.model)
        if game is None and "game" not in cfg:
            raise ConfigError(f"{self.model} has no config.json naming its game: pass --game ({', '.join(GAMES)})")
        self.game = resolve_game(game or cfg["game"])
        if "game" in cfg and resolve_game(cfg["game"]) != self.game:
            raise ConfigError(f"{self.model} was trained on {cfg['game']}, not {self.game}")
        self.noop_max, self.frame_skip = cfg.get("noop_max", NOOP_MAX), cfg.get("frame_skip", FRAME_SKIP)
        if cfg.get("screen_size", SCREEN_SIZE) != SCREEN_SIZE or cfg.get("frame_stack", FRAME_STACK) != FRAME_STACK:
            raise ExpertError(f"{self.model}: only {SCREEN_SIZE}x{SCREEN_SIZE} frames stacked {FRAME_STACK} are supported")
        self.deterministic = deterministic
        self.sha256 = hashlib.sha256(self.model.read_bytes()).hexdigest()

    def make_env(self):
        import torch

        torch.set_num_threads(1)
        self.env = make_play_env(self.game, self.noop_max, self.frame_skip)
        fire = "FIRE" in self.env.unwrapped.get_action_meanings()
        self.player = AtariPlayer(load_policy(self.model), self.env.action_space.n, fire, self.deterministic)
        return self.env

    def reset_env(self, env, seed: int):
        obs, info = env.reset(seed=seed)
        return obs, info, {"seed": seed}

    def step_fields(self, obs, info: dict) -> dict[str, np.ndarray]:
        return {"frame": obs[:, :, 0], "lives": np.uint8(lives(self.env))}

    def begin(self, obs, seed: int) -> None:
        self.player.begin(lives(self.env), seed)

    def act(self, obs) -> int:
        return self.player.act(obs, lives(self.env))

    def summary(self, env) -> dict:
        return {"score": env.episode_return, "game": self.game, "lives_left": lives(self.env)}

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "env": env_id(self.game), "game": self.game,
                "model_sha256": self.sha256, "model_file": self.model.name, "deterministic": self.deterministic,
                "noop_max": self.noop_max, "frame_skip": self.frame_skip, "screen_size": SCREEN_SIZE,
                "policy_frame_stack": FRAME_STACK, "reward": "unclipped", "episode": "full game"}

    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None
