"""The environments RL trains and is evaluated on: NLE tasks (NetHackScore-v0, NetHackChallenge-v0)
played game after game, each game seeded from a stream of its own.

``SeededGames`` is the Gymnasium env an actor steps: every reset starts the next game of
its stream, seeded exactly as collection and evaluation seed theirs (``NetHackExpert.reset_env``:
NetHack's RNGs from the game's seed, the start-time pin), and each observation carries the fields
the model reads, the previous action (-1 at a game's start) and the game's return so far.
``make_actor_envs`` stacks ``envs`` of them into one TorchRL env (``NetHackGames``: one batched policy
forward per step), with the LSTM state and the episode-start flag the policy needs.
"""
from __future__ import annotations

from functools import cache

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


def _specs(game: SeededGames, envs: int) -> dict:
    """TorchRL specs of ``envs`` stacked games: the observation fields as NLE gives them, ``prev_action``
    and ``episode_return`` (envs, 1), a categorical action (envs,), reward and done flags (envs, 1)."""
    import torch
    from torchrl.data import Bounded, Categorical, Composite, Unbounded

    def box(space, shape=None):
        shape = (envs, *(shape or space.shape))
        low, high = np.broadcast_to(space.low, space.shape).min(), np.broadcast_to(space.high, space.shape).max()
        return Bounded(float(low), float(high), shape, dtype=torch.from_numpy(np.zeros(0, space.dtype)).dtype)

    space = game.observation_space
    obs = {k: box(space[k]) for k in game.fields}
    obs["prev_action"] = box(space["prev_action"], (1,))
    obs["episode_return"] = Unbounded((envs, 1), dtype=torch.float32)
    flags = {k: Categorical(2, (envs, 1), dtype=torch.bool) for k in ("done", "terminated", "truncated")}
    return dict(observation=Composite(obs, shape=(envs,)), action=Categorical(game.action_space.n, (envs,)),
                reward=Unbounded((envs, 1), dtype=torch.float32), done=Composite(flags, shape=(envs,)))


@cache
def _games_env_class():
    from torchrl.envs import EnvBase

    class NetHackGames(EnvBase):
        """``envs`` ``SeededGames`` stepped in turn in this process and stacked into one TensorDict
        (a TorchRL env of batch size (envs,)): what ``SerialEnv`` of ``GymWrapper``s gives, without
        their per-game TensorDicts (~4.5x the time of the games themselves on NetHackScore-v0).
        Game i plays stream ``stream + (i,)``; a reset with ``_reset`` starts the next game of the
        marked streams only."""

        def __init__(self, env_id: str, character: str, fields: tuple[str, ...], seed: int, stream: tuple[int, ...],
                     envs: int):
            import torch

            super().__init__(batch_size=torch.Size([envs]))
            self.games = [SeededGames(env_id, character, fields, seed, tuple(stream) + (i,)) for i in range(envs)]
            self.fields = tuple(fields) + ("prev_action", "episode_return")
            specs = _specs(self.games[0], envs)
            self.observation_spec, self.action_spec = specs["observation"], specs["action"]
            self.reward_spec, self.done_spec = specs["reward"], specs["done"]
            self.last: list[dict] = [{} for _ in range(envs)]

        def _pack(self, **flags):
            import torch
            from tensordict import TensorDict

            out = {k: torch.from_numpy(np.stack([o[k] for o in self.last])) for k in self.fields}
            for k in ("prev_action", "episode_return"):
                out[k] = out[k][:, None]
            out |= {k: torch.from_numpy(v)[:, None] for k, v in flags.items()}
            return TensorDict(out, batch_size=self.batch_size)

        def _reset(self, tensordict=None, **kwargs):
            mask = tensordict.get("_reset", None) if tensordict is not None else None
            mask = np.ones(len(self.games), bool) if mask is None else mask.reshape(-1).numpy()
            for i in np.flatnonzero(mask):
                self.last[i] = self.games[i].reset()[0]
            no = np.zeros(len(self.games), bool)
            return self._pack(done=no, terminated=no, truncated=no)

        def _step(self, tensordict):
            n = len(self.games)
            reward, term, trunc = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
            for i, (game, a) in enumerate(zip(self.games, tensordict["action"].tolist())):
                self.last[i], reward[i], term[i], trunc[i], _ = game.step(a)
            return self._pack(reward=reward, done=term | trunc, terminated=term, truncated=trunc)

        def _set_seed(self, seed):
            return seed  # games are seeded by their streams

        def close(self, *, raise_if_closed: bool = True):
            for g in self.games:
                g.close()
            self.games = []
            return super().close(raise_if_closed=raise_if_closed)

    return NetHackGames


def make_actor_envs(env_id: str, character: str, fields: tuple[str, ...], seed: int, stream: tuple[int, ...],
                    envs: int, states: dict[str, tuple[int, ...]]):
    """``envs`` games of ``env_id`` stepped together (``NetHackGames``: one batched policy forward per
    step); env i plays the stream ``stream + (i,)``. ``states`` names the recurrent state entries
    (name -> shape) the policy reads and writes, zero at every reset; ``is_init`` marks each game's
    first step."""
    import torch
    from torchrl.data import Unbounded
    from torchrl.envs import Compose, InitTracker, TensorDictPrimer, TransformedEnv

    torch.set_num_threads(1)
    games = _games_env_class()(env_id, character, tuple(fields), seed, tuple(stream), envs)
    primers = TensorDictPrimer(**{k: Unbounded((envs, *shape)) for k, shape in states.items()}, expand_specs=False)
    return TransformedEnv(games, Compose(InitTracker(), primers))


def env_actions(env_id: str) -> list[int]:
    """The keypress of each action of ``env_id``'s action set, in order."""
    import nle  # noqa: F401

    env = gym.make(env_id)
    try:
        return [int(a) for a in env.unwrapped.actions]
    finally:
        env.close()
