"""Policies that act for a batch of envs at once.

A policy sees *lanes*: envs of one worker, each playing its current episode. ``start(n)`` begins a
unit of work with lanes ``0..n-1``; ``begin(lane, seed)`` marks a lane's episode start (the next
``act`` treats it as a reset); ``act(lanes, obs)`` returns one action per listed lane, in order, for
the observations ``obs`` (the fields the dataset stores: ``Expert.step_fields``). A lane that leaves
the unit is simply not listed again; the set of listed lanes only ever shrinks within a unit.

``BCPolicy`` runs one batched forward per call. The NetHack Transformer decodes incrementally with
a KV cache, in blocks of ``context`` steps (default: the training ``seq_len``) from the episode
start: step t of an episode sees steps ``context * (t // context) .. t``, exactly what a training
unroll of ``seq_len`` steps shows a step (no state but the previous action crosses unrolls), so the
logits equal the training forward's over those steps. At a block start the lane's cached keys are
hidden and its rotary positions restart; the previous action carries over, as between training
unrolls. (A sliding window of the last ``context`` keys would not do: with more than one layer its
cached keys carry information from up to ``layers * (context - 1)`` steps back, states no training
step had.) A lane's episode start is a ``reset`` row, which also zeroes the previous-action input.
The LSTM carries its (h, c) through the whole episode, as training carries it across unrolls.
Actions are sampled from ``softmax(logits / temperature)`` (or taken greedily) with a generator
seeded by the episode's seed, so a game does not depend on the other lanes' draws.
"""
from __future__ import annotations

import numpy as np

POLICY_SALT = 0x706F6C69  # "poli": the action sampler's stream, apart from the env's seeds


def episode_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), POLICY_SALT])


def sample(logits: np.ndarray, rngs: list, greedy: bool, temperature: float) -> list[int]:
    """One action per row of ``logits`` (B, A): argmax, or a draw from softmax(logits / temperature)."""
    if greedy:
        return [int(a) for a in logits.argmax(1)]
    z = logits.astype(np.float64) / temperature
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    out = []
    for row, rng in zip(p, rngs):
        c = np.cumsum(row)
        out.append(int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(row) - 1)))
    return out


class RandomPolicy:
    """Uniformly random actions: the baseline every return is compared with."""

    batched = True
    name = "random"

    def __init__(self, n_actions: int):
        self.n_actions = n_actions
        self.rngs: dict[int, np.random.Generator] = {}

    def start(self, n: int) -> None:
        self.rngs = {}

    def begin(self, lane: int, seed: int) -> None:
        self.rngs[lane] = episode_rng(seed)

    def act(self, lanes: list[int], obs: list[dict]) -> list[int]:
        return [int(self.rngs[lane].integers(self.n_actions)) for lane in lanes]


def select_rows(state, idx):
    """``NetHackState`` restricted to batch rows ``idx`` (a LongTensor)."""
    from dataclasses import replace

    return replace(
        state,
        prev_action=state.prev_action[idx],
        hidden=None if state.hidden is None else tuple(h[:, idx] for h in state.hidden),
        kv=None if state.kv is None else [(k[idx], v[idx]) for k, v in state.kv],
        kv_valid=None if state.kv_valid is None else state.kv_valid[idx],
        pos=None if state.pos is None else state.pos[idx],
    )


class BCPolicy:
    """A BC checkpoint's model acting for many lanes with one forward per step (see the module docstring)."""

    batched = True
    name = "bc"

    def __init__(self, model, ckpt: dict, greedy: bool = False, temperature: float = 1.0, device="cpu",
                 context: int | None = None):
        import torch

        self.torch = torch
        self.model, self.ckpt = model, ckpt
        self.family = ckpt["family"]
        self.greedy, self.temperature, self.device = greedy, float(temperature), torch.device(device)
        cfg = model.cfg
        self.n_actions = cfg.n_actions
        self.context = int(context or context_steps(ckpt))
        if self.family == "nethack":
            self.fields = ["tty_chars", "tty_colors", "tty_cursor"] + ["inv_glyphs"] * cfg.use_inventory \
                + ["glyphs"] * cfg.use_glyphs
            self.cache_len = self.context - 1 if cfg.core == "transformer" else 0
        else:
            from trajdata.envs.atari import FrameStack

            self.frame_stack = cfg.frame_stack
            self._FrameStack = FrameStack
        self.state = None
        self.rows: list[int] = []

    def start(self, n: int) -> None:
        self.rows = list(range(n))
        self.rngs, self.fresh, self.stacks, self.steps = {}, {}, {}, {}
        if self.family == "nethack":
            self.state = self.model.initial_state(n, self.device, cache_len=self.cache_len)

    def begin(self, lane: int, seed: int) -> None:
        self.rngs[lane] = episode_rng(seed)
        self.fresh[lane] = True
        self.steps[lane] = 0
        if self.family == "atari":
            self.stacks.setdefault(lane, self._FrameStack(self.frame_stack)).reset()

    def logits(self, lanes: list[int], obs: list[dict]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            if self.family == "nethack":
                if lanes != self.rows:
                    pos = {lane: i for i, lane in enumerate(self.rows)}
                    idx = torch.tensor([pos[lane] for lane in lanes], device=self.device)
                    self.state = select_rows(self.state, idx)
                    self.rows = list(lanes)
                if self.cache_len:
                    block = [i for i, lane in enumerate(lanes) if self.steps[lane] % self.context == 0
                             and not self.fresh[lane]]
                    if block:  # a new block of ``context`` steps: hide the lane's keys, restart positions
                        idx = torch.tensor(block, device=self.device)
                        self.state.kv_valid[idx] = False
                        self.state.pos[idx] = 0
                batch = {k: torch.from_numpy(np.stack([o[k] for o in obs]))[:, None].to(self.device)
                         for k in self.fields}
                batch["reset"] = torch.tensor([self.fresh[lane] for lane in lanes], device=self.device)[:, None]
                out, self.state = self.model(batch, self.state)
            else:
                frames = np.stack([self.stacks[lane].push(o["frame"], o["lives"]) for lane, o in zip(lanes, obs)])
                out, _ = self.model({"frame": torch.from_numpy(frames)[:, None].to(self.device)})
        return out[:, -1].float().cpu().numpy()

    def act(self, lanes: list[int], obs: list[dict]) -> list[int]:
        logits = self.logits(lanes, obs)
        actions = sample(logits, [self.rngs[lane] for lane in lanes], self.greedy, self.temperature)
        self.played(lanes, actions)
        return actions

    def played(self, lanes: list[int], actions: list[int]) -> None:
        """After ``logits(lanes, obs)``: the lanes took ``actions`` (the next step's previous action)."""
        for lane in lanes:
            self.fresh[lane] = False
            self.steps[lane] += 1
        if self.family == "nethack":
            self.state.prev_action = self.torch.tensor(actions, dtype=self.torch.long, device=self.device)


def context_steps(ckpt: dict) -> int:
    """The most steps of its episode a training step saw: the training ``seq_len`` (or ``context``)."""
    train = ckpt.get("train") or {}
    return int(train.get("context") or train.get("seq_len") or 1)
