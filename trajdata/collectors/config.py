"""What a collection runs: the expert to build in each worker, and the collection's settings.

Light on purpose (no gymnasium, no env packages): the CLI reads its defaults from here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from trajdata.config import at_least, choose, coerce_fields, option, require
from trajdata.errors import ExpertError
from trajdata.format.codec import DEFAULT_PROFILE, PROFILE_HELP, PROFILES
from trajdata.format.shard import DEFAULT_CHUNK_STEPS

BACKENDS = ("local", "ray")
# expert name -> (the class a worker builds, the keyword arguments it takes)
EXPERTS = {"scripted": ("trajdata.collectors.nethack:ScriptedExpert", ("character", "fix_moon_phase")),
           "autoascend": ("trajdata.collectors.autoascend:AutoAscendExpert",
                          ("character", "fix_moon_phase", "no_progress_timeout", "source")),
           "ppo": ("trajdata.collectors.atari:PPOExpert", ("model", "game", "deterministic"))}


@dataclass(frozen=True)
class ExpertSpec:
    """What to instantiate in each worker: ``target`` is ``"module:Class"``."""

    target: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def named(cls, name: str, **kwargs) -> ExpertSpec:
        """The spec of expert ``name`` (a key of ``EXPERTS``)."""
        choose(name, EXPERTS, "expert")
        return cls(EXPERTS[name][0], kwargs)

    def build(self):
        module, _, cls = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)(**self.kwargs)
        except (ImportError, AttributeError) as e:
            raise ExpertError(f"cannot load expert {self.target}: {e}") from None


@dataclass
class CollectConfig:
    """Every setting of a collection (the flags every `trajdata collect` command shares)."""

    out: str = option(help="Dataset directory (created, or resumed).", metavar="DIRECTORY")
    expert: ExpertSpec = option(cli=False)
    shards: int = option(4, "Number of shards (units of work).")
    episodes_per_shard: int = option(1, "Episodes played into each shard (a dataset holds shards x this many).")
    workers: int = option(1, "Parallel worker processes.")
    seed: int = option(0, "Base seed; episode seeds derive from it.")
    max_steps: int | None = option(10_000, "Per-episode step cap (episode kept, marked truncated).")
    max_seconds: float | None = option(None, "Per-episode wall-time cap.")
    stall_seconds: float | None = option(60.0, "Watchdog: truncate an episode after this long without a step; "
                                               "0 disables the watchdog.")
    hard_stall_seconds: float | None = option(None, "Backstop for hangs inside C code: dump the stack and kill the "
                                                    "worker after this long without a step (its shard is retried). "
                                                    "Default: max(2 x stall, stall + 30); 0 = off.")
    max_shard_retries: int = option(2, "Rerun a shard whose worker died (crash, out of memory, hang) this many "
                                       "times, then give it up.")
    chunk_steps: int = option(DEFAULT_CHUNK_STEPS, "Steps per stored chunk.")
    codec: str = option(DEFAULT_PROFILE, PROFILE_HELP, choices=sorted(PROFILES))
    backend: str = option("local", "local worker processes, or Ray tasks.", choices=BACKENDS)
    ray_address: str | None = option(None, "Ray cluster address (with --backend ray; default: start local Ray).")

    def __post_init__(self):
        coerce_fields(self)
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
