"""A run's shape: the model it builds, its effective parameters N, FLOPs per sample, samples per
optimizer step and the sample count at which each FLOP budget falls. `train bc` and `sweep` both
ask ``run_shape`` (so a plan's numbers are the run's).

FLOPs per sample are the family's multiplier times its per-sample unit
(``trajdata.models.flops.FAMILIES``: 6 x N for NetHack BC, C = 6ND; 3 x forward FLOPs for Atari;
8 x N for RL, C = 8ND). A trainer that picks its model its own way (`train rl`) asks ``model_shape``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from trajdata.config import require
from trajdata.models.atari import AtariConfig
from trajdata.models.flops import FAMILIES, Family
from trajdata.models.nethack import NetHackConfig
from trajdata.models.sizes import NETHACK_GRID, PAPER_SIZE, atari_width_for_params, size_for_params

# presets: the paper's ten NetHack sizes, smallest first, and its headline size
PRESETS = {f"grid-{i + 1}": hl for i, hl in enumerate(NETHACK_GRID)} | {"paper": PAPER_SIZE}


@dataclass(frozen=True)
class RunShape:
    """What sizes a run (``run_shape`` builds it)."""

    family: str
    model: NetHackConfig | AtariConfig
    params: int  # N: effective parameters
    flops_per_sample: int
    grad_accum: int  # micro-batches per optimizer step (from samples_per_step when that is given)
    samples_per_step: int  # B x T x grad_accum x ranks: what one optimizer step can hold
    budgets: tuple[float, ...]

    def samples_for(self, budget: float) -> int:
        """D at which budget C falls: its snapshot is the first optimizer step with D >= C / (FLOPs per sample)."""
        return math.ceil(budget / self.flops_per_sample)

    @property
    def budget_samples(self) -> list[tuple[float, int]]:
        """(budget, samples) of every budget, ascending."""
        return [(b, self.samples_for(b)) for b in self.budgets]

    def flops(self, samples: int) -> int:
        """Training FLOPs C of ``samples`` samples."""
        return samples * self.flops_per_sample

    def steps_for(self, samples: int) -> int:
        """Optimizer steps that ``samples`` take when every step is full."""
        return math.ceil(samples / self.samples_per_step)


def run_shape(cfg, family: str, n_actions: int | None = None, world: int = 1,
              counting: Family | None = None) -> RunShape:
    """The shape of BC config ``cfg`` (a ``BCConfig``) for model ``family`` on ``world`` ranks;
    ``n_actions``: the Atari game's action count (default 18); ``counting``: how FLOPs are counted
    (default: the family's ``FAMILIES`` entry)."""
    mcfg = model_config(cfg, family, n_actions)
    B, T = cfg.batch_size, cfg.seq_len
    accum = cfg.grad_accum
    if cfg.samples_per_step is not None:
        require(cfg.samples_per_step % (B * T * world) == 0, "samples_per_step",
                f"{cfg.samples_per_step} is not a multiple of batch_size x seq_len x ranks = {B * T * world}")
        accum = cfg.samples_per_step // (B * T * world)
    return model_shape(mcfg, family, B * T * accum * world, cfg.budgets, counting, accum)


def model_shape(mcfg: NetHackConfig | AtariConfig, family: str, samples_per_step: int, budgets=(),
                counting: Family | None = None, grad_accum: int = 1) -> RunShape:
    """The shape of a run of model ``mcfg`` whose optimizer steps take ``samples_per_step`` samples:
    N and FLOPs per sample as ``counting`` (default: ``FAMILIES[family]``) counts them."""
    counting = counting or FAMILIES[family]
    return RunShape(family=family, model=mcfg, params=counting.params(mcfg),
                    flops_per_sample=counting.flops_per_sample(mcfg), grad_accum=grad_accum,
                    samples_per_step=samples_per_step, budgets=tuple(budgets))


def model_config(cfg, family: str, n_actions: int | None = None) -> NetHackConfig | AtariConfig:
    """The model config that BC config ``cfg`` asks for: its size (preset, params, or width and
    layers) and the NetHackConfig fields it passes through (``heads``, ``core``, ``use_*``)."""
    if family == "atari":
        require(cfg.preset is None, "preset", "presets are NetHack sizes; size the Atari CNN with --width or --params")
        width = cfg.width or (atari_width_for_params(cfg.params) if cfg.params else AtariConfig.width)
        return AtariConfig(width=width, n_actions=n_actions or 18)
    base = NetHackConfig(**{k: getattr(cfg, k) for k in passed_fields(type(cfg))})
    if cfg.preset:
        h, L = PRESETS[cfg.preset]
    elif cfg.params:
        h, L = size_for_params(cfg.params, base)
    else:
        h, L = cfg.width or base.width, cfg.layers or base.layers
    return replace(base, width=h, layers=L)


def passed_fields(cls) -> list[str]:
    """The NetHackConfig fields that config class ``cls`` declares too (the size, width and layers,
    is chosen apart)."""
    own = {f.name for f in fields(cls)}
    return [f.name for f in fields(NetHackConfig) if f.name in own and f.name not in ("width", "layers")]


def atari_actions(info: dict) -> int:
    """The size of the action set an Atari dataset's expert acted in (the env's minimal set)."""
    from trajdata.envs.atari import make_play_env

    expert = info.get("expert", {})
    env = make_play_env(expert.get("game") or info.get("env"))
    try:
        return int(env.action_space.n)
    finally:
        env.close()
