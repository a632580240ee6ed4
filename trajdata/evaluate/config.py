"""The settings of one evaluation (``trajdata eval``): one dataclass, validated in one place.

Light on purpose (no torch, no env packages): the CLI reads its defaults from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trajdata.config import DEVICE, at_least, choose, coerce_fields, option, require

BACKENDS = ("local", "ray")
EXPERTS = ("scripted", "autoascend", "random")  # and "ppo:MODEL"
# Per-episode step caps when --max-steps is not given (NetHack: 100k, as the paper's evaluation; Atari: ALE's 108k frames).
DEFAULT_MAX_STEPS = {"nethack": 100_000, "atari": 27_000}
_CHARACTER = re.compile(r"^(@|[a-z]{3}(-[a-z]{3}){0,3})$")


@dataclass
class EvalConfig:
    """Every option of an evaluation.

    ``expert`` None evaluates BC checkpoints; otherwise ``scripted``, ``autoascend``, ``ppo:MODEL``
    (an SB3 zip or a ``train ppo`` run) or ``random`` (uniform over the env's actions) plays the same
    seeds. ``envs`` is how many envs one worker steps together (one batched forward per step);
    ``unit_episodes`` (default ``2 * envs``) how many consecutive episodes form one unit of work:
    a unit always plays the same way whichever worker runs it, so 1 or N workers give the same
    returns. ``context`` overrides the Transformer's context in steps (default: the checkpoint's
    training ``seq_len``).
    """

    episodes: int = option(100, "Episodes, seeded from --seed: every one is played to its end or --max-steps.")
    seed: int = option(0, "First seed of the fixed episode list.")
    max_steps: int | None = option(None, "Step cap per episode [NetHack 100000, Atari 27000].")
    workers: int = option(1, "Worker processes.")
    envs: int = option(8, "Envs each worker steps together (one batched forward per step).")
    unit_episodes: int | None = option(None, "Consecutive episodes per unit of work [2 x --envs].")
    greedy: bool = option(False, "Take the argmax action instead of sampling from the softmax.")
    temperature: float = option(1.0, "Sampling temperature (divides the logits).")
    budget: float | None = option(None, "Evaluate the run's snapshot for this FLOP budget.")
    all: bool = option(False, "Evaluate every snapshot of the run.")
    expert: str | None = option(None, "Play an expert on the same seeds instead: scripted, autoascend, random, "
                                      "or ppo:MODEL.")
    character: str | None = option(None, "NetHack character ('@' = random) instead of the dataset's.")
    env: str | None = option(None, "The env when no checkpoint names it: nethack or an Atari game.")
    record: str | None = option(None, "Write the rollouts as a trajdata dataset here.")
    record_chunk_steps: int = option(1024, "Steps per chunk of the recorded dataset.")
    out: str | None = option(None, "Directory of the eval JSONs [RUN/eval].")
    context: int | None = option(None, "Transformer context in steps [the checkpoint's training --seq-len].")
    backend: str = option("local", "local processes or ray.", choices=BACKENDS)
    ray_address: str | None = option(None, "Ray cluster address (--backend ray).")
    device: str = option("cpu", "Torch device of the policy: cpu, cuda, cuda:N or mps.")
    threads: int = option(1, "Torch threads per worker.")
    update_runs: bool = option(True, "Write return, return_se, episodes into RUN/runs.csv.")

    def __post_init__(self):
        coerce_fields(self)
        at_least(self, 1, "episodes", "workers", "envs", "threads", "record_chunk_steps")
        at_least(self, 0, "seed")
        require(bool(DEVICE.match(self.device)), "device", f"{self.device!r}: use cpu, cuda, cuda:N or mps")
        at_least(self, 1, "max_steps", "unit_episodes", "context", optional=True)
        require(self.temperature > 0, "temperature", f"must be positive (got {self.temperature})")
        require(not (self.all and self.budget is not None), "budget", "and --all exclude each other")
        require(self.budget is None or self.budget > 0, "budget", f"must be positive (got {self.budget})")
        choose(self.backend, BACKENDS, "backend")
        if self.expert is not None:
            require(self.expert in EXPERTS or (self.expert.startswith("ppo:") and len(self.expert) > 4), "expert",
                    f"{self.expert!r}: choose one of {', '.join(EXPERTS)}, ppo:MODEL")
        if self.character is not None:
            require(bool(_CHARACTER.match(self.character)), "character",
                    f"{self.character!r}: use '@' (random) or e.g. 'mon-hum-neu-mal'")

    @property
    def unit_size(self) -> int:
        return self.unit_episodes or 2 * self.envs
