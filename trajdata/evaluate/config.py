"""The settings of one evaluation (``trajdata eval``): one dataclass, validated in one place.

Light on purpose (no torch, no env packages): the CLI reads its defaults from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trajdata.config import at_least, choose, require

BACKENDS = ("local", "ray")
EXPERTS = ("scripted", "autoascend", "random")  # and "ppo:MODEL"
# Per-episode step caps when --max-steps is not given (DESIGN §8: NetHack 100k; Atari: ALE's 108k frames).
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

    episodes: int = 100
    seed: int = 0
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS of the env family
    workers: int = 1
    envs: int = 8
    unit_episodes: int | None = None
    greedy: bool = False
    temperature: float = 1.0
    budget: float | None = None
    all: bool = False
    expert: str | None = None
    character: str | None = None  # NetHack: override the dataset's character ('@' = random per episode)
    env: str | None = None  # "nethack" or an Atari game: the env when no checkpoint says it
    record: str | None = None  # write the rollouts as a trajdata dataset here
    record_chunk_steps: int = 1024
    out: str | None = None  # directory of the eval JSONs (default: RUN/eval)
    context: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    device: str = "cpu"
    threads: int = 1  # torch threads per worker
    update_runs: bool = True  # write return/return_se/episodes into RUN/runs.csv

    def __post_init__(self):
        at_least(self, 1, "episodes", "workers", "envs", "threads", "record_chunk_steps")
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
