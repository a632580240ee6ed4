"""The settings of one RL run (``trajdata train rl``): one dataclass, validated in one place.

Light on purpose (no torch, no env packages): the CLI reads its defaults from here.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from trajdata.config import at_least, choose, require
from trajdata.errors import ConfigError

# env id -> its default character (NetHackScore-v0: NLE's human monk; the Challenge: random per game)
ENVS = {"NetHackScore-v0": "mon-hum-neu-mal", "NetHackChallenge-v0": "@"}
DEVICES = ("auto", "cpu", "cuda")
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

    out: str = ""
    run_id: str = ""  # name in runs.csv (default: the run directory's name)
    env: str = "NetHackScore-v0"
    character: str | None = None  # None: the env's default (ENVS)
    # model size: params (--params 1M picks the width at --layers) or width
    params: str | None = None
    width: int | None = None
    layers: int = 1
    use_inventory: bool = True
    use_message: bool = True
    use_glyphs: bool = False
    # start from a BC snapshot (the LSTM-core family), optionally kickstarted toward it
    init: str | None = None
    kickstart_coef: float = 0.0  # weight of the cross-entropy to the BC policy at learner step 0
    kickstart_decay: float = 0.999  # its factor per learner step: coef * decay^step
    # actors and batches
    actors: int = 1  # actor processes (0: act in the learner's process, synchronously)
    envs: int = 16  # envs per actor, stepped together with one batched forward; rows of a learner batch
    unroll: int = 32  # steps per row of a learner batch (T)
    ray_address: str | None = None  # run the actors on this Ray cluster ("auto", "local" or host:port)
    # IMPALA and RMSprop (the NLE baseline's settings)
    lr: float = 2e-4
    rms_alpha: float = 0.99
    rms_eps: float = 0.01
    rms_momentum: float = 0.0
    grad_clip: float = 40.0  # max global gradient norm (0: off)
    gamma: float = 0.999
    baseline_coef: float = 0.5
    entropy_coef: float = 0.001
    reward_scale: float = 0.1  # rewards are scaled, then clipped to +-reward_clip, for learning only
    reward_clip: float = 10.0
    rho_clip: float = 1.0  # V-trace importance-weight clips
    c_clip: float = 1.0
    # length: up to the largest budget; --steps caps it
    budgets: tuple[float, ...] = ()
    steps: int | None = None
    # machinery
    seed: int = 0
    device: str = "auto"  # the learner's
    threads: int = 1  # torch threads of the learner (each actor uses one)
    log_every: int = 10  # learner steps between metrics.jsonl rows
    checkpoint_every: int = 100  # learner steps between rolling checkpoints
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        self.budgets = tuple(sorted(float(b) for b in self.budgets))
        require(bool(self.out), "out", "is required")
        choose(self.env, ENVS, "env")
        choose(self.device, DEVICES, "device")
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
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist", field="config") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid TOML ({e})", field="config") from None
        data = data.get("rl", data)
        bad = sorted(set(data) - {f.name for f in fields(cls)})
        if bad:
            raise ConfigError(f"config file {p}: unknown field {bad[0]!r}", field="config")
        return cls(**{**data, **overrides})
