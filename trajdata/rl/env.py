"""The environments RL trains and is evaluated on: NLE tasks (NetHackScore-v0, NetHackChallenge-v0)
played game after game, each game seeded from a stream of its own.

``SeededGames`` is the Gymnasium env an actor steps: every reset starts the next game of
its stream, seeded exactly as collection and evaluation seed theirs (``NetHackExpert.reset_env``:
NetHack's RNGs from the game's seed, the start-time pin), and each observation carries the fields
the model reads, the previous action (-1 at a game's start) and the game's return so far.
``make_actor_envs`` wraps ``envs`` of them for TorchRL (``SerialEnv``: one batched policy forward
per step), with the LSTM state and the episode-start flag the policy needs.
"""
from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np

from trajdata.evaluate.rollout import RLHost

RL_SALT = 0x726C7472  # "rltr": training games are a seed stream of their own
CORE_FIELDS = ("tty_chars", "tty_colors", "tty_cursor")


def model_fields(use_inventory: bool = True, use_glyphs: bool = False) -> tuple[str, ...]:
    """The observation fields the NetHack agent reads."""
    return CORE_FIELDS + ("inv_glyphs",) * use_inventory + ("glyphs",) * use_glyphs


def game_seed(seed: int, stream: tuple[int, ...], game: int) -> int:
    """The seed of game ``game`` of ``stream`` (63 bits; the eval and collect streams are salted apart)."""
    state = np.random.SeedSequence([int(seed), RL_SALT, *map(int, stream), int(game)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class SeededGames(gym.Env):
    """Games of ``env_id`` one after another; game k of the stream is seeded by ``game_seed(seed, stream, k)``.

    Observations: ``fields`` (uint8/int8/int16 arrays as NLE gives them), ``prev_action`` (-1 at a
    game's first step) and ``episode_return`` (the game's rewards so far, for logging)."""

    metadata: dict = {}

    def __init__(self, env_id: str, character: str, fields: tuple[str, ...], seed: int, stream: tuple[int, ...]):
        self.host = RLHost(env_id, character)
        self.env = self.host.make_env()
        self.fields, self.seed_, self.stream = tuple(fields), int(seed), tuple(stream)
        self.game = 0
        self.ret = 0.0
        inner = self.env.observation_space
        n = int(self.env.action_space.n)
        self.action_space = gym.spaces.Discrete(n)
        self.observation_space = gym.spaces.Dict(
            {k: inner[k] for k in self.fields}
            | {"prev_action": gym.spaces.Box(-1, n - 1, (), np.int64),
               "episode_return": gym.spaces.Box(-np.inf, np.inf, (), np.float32)})

    def _obs(self, obs: dict, action: int) -> dict:
        out = {k: obs[k] for k in self.fields}
        out["prev_action"] = np.array(action, np.int64)
        out["episode_return"] = np.array(self.ret, np.float32)
        return out

    def reset(self, *, seed=None, options=None):
        s = game_seed(self.seed_, self.stream, self.game)
        self.game += 1
        obs, info, _ = self.host.reset_env(self.env, s)
        self.ret = 0.0
        return self._obs(obs, -1), {}

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(int(action))
        self.ret += float(reward)
        return self._obs(obs, int(action)), float(reward), bool(terminated), bool(truncated), {}

    def close(self) -> None:
        self.env.close()


def _torchrl_env(env_id: str, character: str, fields: tuple[str, ...], seed: int, stream: tuple[int, ...]):
    import torch
    from torchrl.envs import GymWrapper

    torch.set_num_threads(1)
    return GymWrapper(SeededGames(env_id, character, fields, seed, stream), categorical_action_encoding=True)


def make_actor_envs(env_id: str, character: str, fields: tuple[str, ...], seed: int, stream: tuple[int, ...],
                    envs: int, states: dict[str, tuple[int, ...]]):
    """``envs`` games of ``env_id`` stepped together (a TorchRL ``SerialEnv``); env i plays the
    stream ``stream + (i,)``. ``states`` names the recurrent state entries (name -> shape) the
    policy reads and writes, zero at every reset; ``is_init`` marks each game's first step."""
    from torchrl.data import Unbounded
    from torchrl.envs import Compose, InitTracker, SerialEnv, TensorDictPrimer, TransformedEnv

    makers = [partial(_torchrl_env, env_id, character, tuple(fields), seed, tuple(stream) + (i,))
              for i in range(envs)]
    primers = TensorDictPrimer(**{k: Unbounded((envs, *shape)) for k, shape in states.items()}, expand_specs=False)
    return TransformedEnv(SerialEnv(envs, makers), Compose(InitTracker(), primers))


def env_actions(env_id: str) -> list[int]:
    """The keypress of each action of ``env_id``'s action set, in order."""
    import nle  # noqa: F401

    env = gym.make(env_id)
    try:
        return [int(a) for a in env.unwrapped.actions]
    finally:
        env.close()
