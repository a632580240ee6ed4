"""An RL run's shape: the agent it builds (sized by --width or --params at --layers, or the --init BC
snapshot's architecture), N, FLOPs per env step and the env steps at which each budget falls, as
``trajdata.train.shape.RunShape`` holds them for BC (``model_shape`` with the ``nethack-rl`` count of
``models.flops.FAMILIES``: N = mixer + LSTM core + policy and value heads, C = 8ND). `train rl` and
`sweep` both ask ``run_shape``.
"""
from __future__ import annotations

from dataclasses import replace

from trajdata.errors import ConfigError
from trajdata.models.flops import FAMILIES
from trajdata.models.nethack import NetHackConfig
from trajdata.rl.config import ENV_ACTIONS, RLConfig
from trajdata.train.shape import RunShape, model_shape

FAMILY = "nethack-rl"  # the family column of RL rows in runs.csv, and its FLOP count
DEFAULT_WIDTH = 64


def effective_params(cfg: NetHackConfig) -> int:
    """N of an RL agent: the BC count (mixer + LSTM core + policy head) plus the value head."""
    return FAMILIES[FAMILY].params(cfg)


def width_for_params(target: int, base: NetHackConfig, multiple: int = 8) -> int:
    """The LSTM width (a multiple of ``multiple``) at ``base.layers`` whose N is closest to ``target``."""
    best, h = multiple, multiple
    while True:
        n = effective_params(replace(base, width=h))
        if abs(n - target) < abs(effective_params(replace(base, width=best)) - target):
            best = h
        if n >= target:
            return best
        h += multiple


def model_config(cfg: RLConfig, n_actions: int | None = None, bc_cfg: NetHackConfig | None = None) -> NetHackConfig:
    """The agent's NetHackConfig: the BC snapshot's architecture with ``--init`` (``bc_cfg``), else
    sized by --width or --params at --layers; ``n_actions`` defaults to the env's."""
    from trajdata.config import parse_count

    n_actions = n_actions or ENV_ACTIONS[cfg.env]
    if bc_cfg is not None:
        if cfg.width is not None and cfg.width != bc_cfg.width:
            raise ConfigError(f"width {cfg.width} differs from the --init snapshot's {bc_cfg.width} "
                              "(RL from BC keeps the BC architecture)", field="width")
        if cfg.params is not None:
            raise ConfigError("params cannot size a run that starts from --init (it keeps the BC architecture)",
                              field="params")
        if cfg.layers not in (1, bc_cfg.layers):
            raise ConfigError(f"layers {cfg.layers} differs from the --init snapshot's {bc_cfg.layers}", field="layers")
        if cfg.encoders not in ("paper", bc_cfg.encoders):
            raise ConfigError(f"encoders {cfg.encoders} differ from the --init snapshot's {bc_cfg.encoders}",
                              field="encoders")
        return replace(bc_cfg, n_actions=n_actions, heads=0)
    base = NetHackConfig(width=DEFAULT_WIDTH, layers=cfg.layers, core="lstm", n_actions=n_actions,
                         use_inventory=cfg.use_inventory, use_message=cfg.use_message, use_glyphs=cfg.use_glyphs,
                         encoders=cfg.encoders)
    if cfg.params is not None:
        return replace(base, width=width_for_params(parse_count(cfg.params, "params", positive=True), base))
    return replace(base, width=cfg.width or DEFAULT_WIDTH)


def run_shape(cfg: RLConfig, n_actions: int | None = None, bc_cfg: NetHackConfig | None = None) -> RunShape:
    """The run's shape: its agent, N, 8N FLOPs per env step, ``envs`` x ``unroll`` env steps per learner step."""
    return model_shape(model_config(cfg, n_actions, bc_cfg), FAMILY, cfg.envs * cfg.unroll, cfg.budgets)
