"""What a collection runs: the expert to build in each worker, and the collection's settings.

Light on purpose (no gymnasium, no env packages): the CLI reads its defaults from here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from trajdata.config import at_least, choose, require
from trajdata.errors import ExpertError
from trajdata.format.codec import DEFAULT_PROFILE, PROFILES
from trajdata.format.shard import DEFAULT_CHUNK_STEPS

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ExpertSpec:
    """What to instantiate in each worker: ``target`` is ``"module:Class"``."""

    target: str
    kwargs: dict = field(default_factory=dict)

    def build(self):
        module, _, cls = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)(**self.kwargs)
        except (ImportError, AttributeError) as e:
            raise ExpertError(f"cannot load expert {self.target}: {e}") from None


@dataclass
class CollectConfig:
    out: str
    expert: ExpertSpec
    shards: int = 4
    episodes_per_shard: int = 1
    workers: int = 1
    seed: int = 0
    max_steps: int | None = 10_000
    max_seconds: float | None = None
    stall_seconds: float | None = 60.0
    hard_stall_seconds: float | None = None
    max_shard_retries: int = 2
    chunk_steps: int = DEFAULT_CHUNK_STEPS
    codec: str = DEFAULT_PROFILE
    backend: str = "local"
    ray_address: str | None = None

    def __post_init__(self):
        at_least(self, 1, "shards", "episodes_per_shard", "workers", "chunk_steps")
        at_least(self, 1, "max_steps", optional=True)
        at_least(self, 0, "max_shard_retries", "seed")
        require(self.stall_seconds is None or self.stall_seconds >= 0, "stall_seconds",
                f"must be 0 (off) or positive (got {self.stall_seconds})")
        require(self.max_seconds is None or self.max_seconds > 0, "max_seconds",
                f"must be positive (got {self.max_seconds})")
        require(self.ray_address is None or self.backend == "ray", "ray_address",
                "needs backend 'ray' (it is ignored by the local backend)")
        require(self.hard_stall_seconds is None or self.hard_stall_seconds >= 0, "hard_stall_seconds",
                f"must be 0 (off) or positive (got {self.hard_stall_seconds})")
        hard = self.hard_seconds()
        if hard and self.stall_seconds and hard < 2 * self.stall_seconds:
            require(False, "hard_stall_seconds",
                    f"({hard:g}) must be at least twice stall_seconds ({self.stall_seconds:g}), or 0 (off)")
        choose(self.codec, PROFILES, "codec")
        choose(self.backend, BACKENDS, "backend")

    def hard_seconds(self) -> float:
        """The hard backstop's timeout: ``hard_stall_seconds``, else max(2 * stall, stall + 30); 0 = off."""
        if self.hard_stall_seconds is not None:
            return float(self.hard_stall_seconds)
        return max(2 * self.stall_seconds, self.stall_seconds + 30) if self.stall_seconds else 0.0
