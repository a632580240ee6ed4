"""The settings of one RL run (``trajdata train rl``): one dataclass, its fields the command's flags,
validated in one place.

Light on purpose (no torch, no env packages): the CLI builds its flags from here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from trajdata.config import PRECISIONS, at_least, choose, coerce_fields, copy_option, from_mapping, option, read_toml, require
from trajdata.models.nethack import NetHackConfig

# env id -> its default character (NetHackScore-v0: NLE's human monk; the Challenge: random per game)
ENVS = {"NetHackScore-v0": "mon-hum-neu-mal", "NetHackChallenge-v0": "@"}
ENV_ACTIONS = {"NetHackScore-v0": 23, "NetHackChallenge-v0": 121}  # the size of each env's action set
DEVICES = ("auto", "cpu", "cuda")
HUMAN_SCORE = 127_000  # the average human NetHack score (Hambro et al. 2022b): the paper's RL forecast target
# fields that may change when the same run is resumed (they change where and how fast, not what is learned)
RESUME_FREE = ("steps", "budgets", "log_every", "checkpoint_every", "progress", "tensorboard", "actors",
               "ray_address", "threads", "device")


@dataclass
class RLConfig:
    """Every hyper-parameter of an RL run (the CLI's flags are these fields).

    IMPALA (V-trace actor-critic) with RMSprop, the paper's NetHack agent with an LSTM core and a
    value (baseline) head. Learner step k trains on one unroll batch of ``envs`` rows x ``unroll``
    steps from one actor; D counts those steps, and budget C's snapshot is taken at the first
    learner step with 8 N D >= C.
    """

    out: str = option("", "Run directory (rerun to resume).", required=True, metavar="DIRECTORY")
    run_id: str = option("", "Name of this run in runs.csv [default: the --out directory's name].")
    env: str = option("NetHackScore-v0", "NLE task: NetHackScore-v0 (the paper's RL env: human monk, 23 actions) "
                                         "or NetHackChallenge-v0.", choices=ENVS)
    character: str | None = option(None, "NetHack character ('@' = random per game) [the env's default].")
    # model size: params (--params 1M picks the width at --layers) or width
    params: str | int | float | None = option(None, "Target effective parameters (100k, 1M): picks the LSTM width "
                                                    "at --layers.", metavar="COUNT")
    width: int | None = option(None, "LSTM core width h (and the mixer's) [64].")
    layers: int = option(1, "LSTM layers.")
    use_inventory: bool = option(True, "Use the inventory encoder.")
    use_message: bool = option(True, "Use the message encoder.")
    use_glyphs: bool = option(False, "Also embed the dungeon glyphs.")
    encoders: str = copy_option(NetHackConfig, "encoders",
                                help="paper (the map ResNet) or cpu (the CPU proxy: block-mean map, ~1/5 of the "
                                     "encoders' FLOPs; see train bc --encoders). With --init: the snapshot's.")
    # start from a BC snapshot (the LSTM-core family), optionally kickstarted toward it
    init: str | None = option(None, "Start from this BC run's largest-budget snapshot (or a .pt file) of the "
                                    "LSTM-core family (train bc --core lstm): its architecture and weights.",
                              metavar="RUN_OR_CKPT")
    kickstart_coef: float = option(0.0, "Weight of the cross-entropy toward the --init BC policy at learner step 0 "
                                        "(0: off).")
    kickstart_decay: float = option(0.999, "Factor on the kickstart weight per learner step.")
    # actors and batches
    actors: int = option(1, "Actor processes (0: act in the learner's process, synchronously). With "
                            "--ray-address: Ray actors.")
    envs: int = option(16, "Games each actor steps together (one batched forward); rows of a learner batch.")
    unroll: int = option(32, "Steps per row of a learner batch (T).")
    ray_address: str | None = option(None, "Run the actors on this Ray cluster (auto, host:port, or local for a Ray "
                                           "started here).")
    # IMPALA and RMSprop (the NLE baseline's settings)
    lr: float = option(2e-4, "RMSprop learning rate.")
    rms_alpha: float = option(0.99, "RMSprop smoothing constant.")
    rms_eps: float = option(0.01, "RMSprop epsilon.")
    rms_momentum: float = option(0.0, "RMSprop momentum.")
    grad_clip: float = option(40.0, "Max global gradient norm (0: off).")
    gamma: float = option(0.999, "Discount.")
    baseline_coef: float = option(0.5, "Weight of the value (baseline) loss, 0.5·(V-trace target - value)² per step.")
    entropy_coef: float = option(0.001, "Weight of the entropy bonus.")
    reward_scale: float = option(0.1, "Rewards are multiplied by this for learning (returns are logged unscaled).")
    reward_clip: float = option(10.0, "Scaled rewards are clipped to +-this.")
    rho_clip: float = option(1.0, "V-trace clip of the importance weights (rho-bar).")
    c_clip: float = option(1.0, "V-trace clip of the trace coefficients (c-bar).")
    # length: up to the largest budget; --steps caps it
    budgets: tuple[float, ...] = option((), "FLOP budgets C = 8ND, comma-separated: a snapshot and a runs.csv row "
                                            "at each.")
    steps: int | None = option(None, "Stop after this many env steps D trained on [default: the largest budget's].",
                               count=True)
    # machinery
    seed: int = option(0, "Seed of the model init, the action sampling and the games.")
    device: str = option("auto", "The learner's device: auto (CUDA when present), cpu or cuda.", choices=DEVICES)
    precision: str = option("auto", "The learner's arithmetic: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32. "
                                    "Actors act in fp32.", choices=PRECISIONS)
    threads: int = option(1, "Torch threads of the learner (each actor uses one).")
    log_every: int = option(10, "Learner steps between metrics.jsonl rows.")
    checkpoint_every: int = option(100, "Learner steps between rolling checkpoints (RUN/checkpoint.pt).")
    progress: bool = option(True, "Show a progress bar.")
    tensorboard: bool = option(True, "Write TensorBoard events to RUN/tb when tensorboard is installed.")

    def __post_init__(self):
        coerce_fields(self)
        self.budgets = tuple(sorted(self.budgets))
        require(bool(self.out), "out", "is required")
        choose(self.env, ENVS, "env")
        choose(self.device, DEVICES, "device")
        choose(self.precision, PRECISIONS, "precision")
        require(not (self.params is not None and self.width is not None), "params",
                "conflicts with --width: give one way to size the model")
        at_least(self, 1, "layers", "envs", "unroll", "threads", "log_every", "checkpoint_every")
        at_least(self, 1, "width", "steps", optional=True)
        at_least(self, 0, "actors", "seed")
        for name in ("lr", "rms_alpha", "rms_eps", "gamma", "reward_scale", "reward_clip", "rho_clip", "c_clip"):
            require(getattr(self, name) > 0, name, f"must be positive (got {getattr(self, name)})")
        require(self.gamma <= 1 and self.rms_alpha < 1, "gamma", "and --rms-alpha must be at most 1")
        for name in ("rms_momentum", "grad_clip", "baseline_coef", "entropy_coef", "kickstart_coef"):
            require(getattr(self, name) >= 0, name, f"must be >= 0 (got {getattr(self, name)})")
        require(0 < self.kickstart_decay <= 1, "kickstart_decay", f"must be in (0, 1] (got {self.kickstart_decay})")
        require(self.kickstart_coef == 0 or self.init is not None, "kickstart_coef",
                "needs --init (the BC policy to kickstart toward)")
        require(all(math.isfinite(b) and b > 0 for b in self.budgets), "budgets",
                f"must be positive finite FLOP counts (got {', '.join(map(str, self.budgets))})")
        if self.character is not None:
            from trajdata.envs.nethack import check_character

            check_character(self.character)
        self.run_id = self.run_id or Path(self.out).name

    @property
    def game_character(self) -> str:
        return self.character or ENVS[self.env]

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides) -> RLConfig:
        """Fields from a TOML file (a table ``[rl]`` or the top level), then ``overrides``."""
        data = read_toml(path)
        return from_mapping(cls, data.get("rl", data), f"config file {path}", **overrides)
