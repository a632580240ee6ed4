"""Atari on ale-py: the env every stage plays, the one frame-stacking rule, and a player for full games.

Training (`trajdata.train.ppo`) uses SB3's AtariWrapper: no-op reset (1..30 raw no-ops), frame-skip 4
with a max over the last two raw frames, 84x84 gray, FIRE on reset, terminal on life loss, clipped
rewards, and a 4-frame stack that restarts (zeros + newest frame) at every such reset.

Collection and evaluation play full games with the real game reward in `make_play_env`: the same
wrapper chain without reward clipping and without terminal-on-life-loss. A recorded episode is fully
determined by its seed (which fixes the no-op count in `reset`) and its actions.

**Frame stacking** (`FrameStack`, `stack_frames`): the policy at step t sees the last k frames of the
current *life*, oldest first, zeros in the slots before the life's first frame. A life starts at the
episode's first step and at every step whose `lives` is below the previous step's. The rule needs only
the recorded `frame` and `lives` fields, so the PPO player, the loader (`frame_stack=k`) and BC
evaluation build the same stacks. A PPO expert also plays the reset actions SB3 applied in training
after a life loss (NOOP, FIRE, 2, as EpisodicLifeEnv + FireResetEnv do); they are ordinary recorded
steps, and their frames are in the stack like any other.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from trajdata.errors import ConfigError

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
    import ale_py
    import gymnasium

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
    if has_fire(env):
        env = FireResetEnv(env)
    return WarpFrame(env, width=screen_size, height=screen_size)


def has_fire(env) -> bool:
    return "FIRE" in env.unwrapped.get_action_meanings()


def lives(env) -> int:
    return int(env.unwrapped.ale.lives())


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


# ---- the frame-stacking rule -------------------------------------------------------------------------

class FrameStack:
    """Stacks of one episode, step by step (see the module docstring): ``push(frame, lives)`` returns
    the (k, H, W) stack the policy sees at that step (a view, overwritten by the next push)."""

    def __init__(self, k: int = FRAME_STACK, shape: tuple[int, int] = (SCREEN_SIZE, SCREEN_SIZE)):
        self.stack = np.zeros((k, *shape), np.uint8)
        self.lives: int | None = None

    def reset(self) -> None:
        """A new episode: the next push starts a life."""
        self.lives = None

    def push(self, frame: np.ndarray, lives: int) -> np.ndarray:
        lives = int(lives)
        if self.lives is None or lives < self.lives:
            self.stack[:] = 0
        else:
            self.stack[:-1] = self.stack[1:]
        self.stack[-1] = np.asarray(frame).reshape(self.stack.shape[1:])
        self.lives = lives
        return self.stack


def life_starts(lives: np.ndarray, prev_lives: int | None) -> np.ndarray:
    """Per step: does a life start here (``prev_lives``: the step before's; None at the episode start)."""
    lives = np.asarray(lives).astype(np.int64)
    starts = np.zeros(len(lives), bool)
    starts[1:] = lives[1:] < lives[:-1]
    if len(lives):
        starts[0] = prev_lives is None or lives[0] < prev_lives
    return starts


def stack_frames(frames: np.ndarray, lives: np.ndarray, k: int, hist: np.ndarray, prev_lives: int | None,
                 run: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int | None, int]:
    """``FrameStack`` for m consecutive steps at once: ``frames`` (m, H, W), ``lives`` (m,); the episode's
    state before them is ``hist`` (k-1, H, W: the previous frames, newest last), ``prev_lives`` (None at
    the episode start) and ``run`` (frames of the current life so far). Writes the (m, k, H, W) stacks
    into ``out`` (or a new array); returns (stacks, hist, prev_lives, run) after these steps."""
    m = len(frames)
    if out is None:
        out = np.empty((m, k, *frames.shape[1:]), frames.dtype)
    if m == 0:
        return out, hist, prev_lives, run
    ext = np.concatenate([hist, frames])
    out[...] = np.moveaxis(np.lib.stride_tricks.sliding_window_view(ext, k, axis=0), -1, 1)
    starts = life_starts(lives, prev_lives)
    idx = np.arange(m)
    last = np.maximum.accumulate(np.where(starts, idx, -run))  # index of the life's first frame
    since = np.minimum(idx - last + 1, k)  # frames of the current life in each stack
    for j in range(k - 1):
        hole = since < k - j
        if hole.any():
            out[hole, j] = 0
    return out, ext[len(ext) - (k - 1):].copy(), int(lives[-1]), int(since[-1])


# ---- playing full games --------------------------------------------------------------------------------

def sb3_actor(policy, deterministic: bool = False) -> Callable[[np.ndarray], int]:
    """An SB3 policy as ``act(stack) -> action`` (stack: (k, 84, 84) uint8)."""
    import torch

    def act(stack: np.ndarray) -> int:
        with torch.no_grad():
            obs = torch.as_tensor(stack[None], device=policy.device)
            return int(policy._predict(obs, deterministic=deterministic)[0])

    return act


class AtariPlayer:
    """Picks an action per `make_play_env` frame from the policy's frame stack (`FrameStack`), playing
    the reset actions SB3 applied in training after a life loss itself.

    `policy` is an SB3 policy or None (uniformly random actions: the random baseline).
    """

    def __init__(self, policy, n_actions: int, fire: bool, deterministic: bool = False, stack: int = FRAME_STACK):
        from trajdata.errors import ExpertError

        self.n_actions = n_actions
        self.reset_actions = [0, 1, 2] if fire else [0]
        self.frames = FrameStack(stack)
        self.act_fn = None
        if policy is not None:
            shape = tuple(policy.observation_space.shape)
            if shape != self.frames.stack.shape:
                raise ExpertError(f"model expects observations of shape {shape}, Atari frames stack to "
                                  f"{self.frames.stack.shape}")
            if policy.action_space.n != n_actions:
                raise ExpertError(f"model has {policy.action_space.n} actions, the game has {n_actions}")
            self.act_fn = sb3_actor(policy, deterministic)

    @property
    def stack(self) -> np.ndarray:
        return self.frames.stack

    def begin(self, lives: int, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.lives, self.queue = lives, []
        self.frames.reset()

    def act(self, frame: np.ndarray, lives: int) -> int:
        """Action for `frame`, every frame of the game from the first; `lives` is the count shown with it."""
        stack = self.frames.push(frame, lives)
        if 0 < lives < self.lives and not self.queue:
            self.queue = list(self.reset_actions)
        self.lives = lives
        if self.queue:
            return self.queue.pop(0)
        if self.act_fn is None:
            return int(self.rng.integers(self.n_actions))
        return self.act_fn(stack)


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
    player = AtariPlayer(policy, env.action_space.n, has_fire(env), deterministic)
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
