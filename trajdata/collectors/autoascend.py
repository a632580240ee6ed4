"""AutoAscend (NetHack Challenge 2021 winner) as a trajdata expert, on stock nle 1.3.0.

AutoAscend owns its loop: `Agent.main()` calls `env.step(action)` on an old-gym env. `AutoAscendEnv`
is that env, built over a gymnasium NetHackChallenge (usually wrapped by trajdata's RecordingEnv, so
every keypress, menu and --More-- keys included, becomes a recorded step). Everything AutoAscend needs
to run on nle 1.3.0 is patched here at import time; its fetched source is never edited.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import types
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trajdata.errors import ExpertError

AUTOASCEND_COMMIT = "8527910"
INSTALL_HINT = "trajdata experts install autoascend"


def find_source(path: str | os.PathLike | None = None) -> Path:
    """The directory holding the `autoascend` package: `path`, else the install cache."""
    from trajdata.collectors.install import installed_path

    root = Path(path) if path is not None else installed_path()
    if root is None or not (Path(root) / "autoascend" / "agent.py").is_file():
        raise ExpertError(f"AutoAscend is not installed; run `{INSTALL_HINT}`")
    return Path(root)


def import_autoascend(path: str | os.PathLike | None = None):
    """Import `autoascend.agent` from the installed source, patched for nle 1.3.0. Returns the module."""
    if "autoascend.agent" in sys.modules:
        return sys.modules["autoascend.agent"]
    root = find_source(path)
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, str(root))
    try:
        import autoascend.agent as agent_lib
    except ImportError as e:
        raise ExpertError(f"AutoAscend's dependencies are missing ({e}); run `{INSTALL_HINT}`") from e
    finally:
        sys.path.remove(str(root))
    fields = agent_lib.BLStats._fields
    if "align" not in fields:  # nle >= 0.9 appends the alignment to blstats (27 fields)
        agent_lib.BLStats = namedtuple("BLStats", fields + ("align",))
    return agent_lib


def unlock_seeding(nle_env) -> None:
    """NetHackChallenge forbids seeding (instance patches on its Nethack, a raising `seed`): undo it."""
    from nle.env.base import NLE

    for name in ("set_initial_seeds", "set_current_seeds", "get_current_seeds"):
        nle_env.nethack.__dict__.pop(name, None)
    nle_env.seed = types.MethodType(NLE.seed, nle_env)


def seeds_for(seed: int) -> tuple[int, int]:
    """NetHack's (core, disp) RNG seeds for a trajdata episode seed."""
    core, disp = np.random.SeedSequence(seed).generate_state(2, np.uint64)
    return int(core >> np.uint64(1)), int(disp >> np.uint64(1))


class AutoAscendEnv:
    """The old-gym env AutoAscend's Agent drives: reset() -> obs, step(action) -> (obs, reward, done, info).

    `env` is a gymnasium NetHackChallenge env, possibly wrapped (e.g. by RecordingEnv). The episode must
    already be reset; `obs` is its first observation. Actions are NLE action enums (or their key codes).
    """

    def __init__(self, env, obs: dict, info: dict | None = None):
        self.env = env
        self.nle = env.unwrapped
        self._actions = self.actions = self.nle.actions
        self._index: dict[int, int] = {}
        for i, a in enumerate(self._actions):
            self._index.setdefault(int(a), i)
        self.first_observation = obs
        self.last_observation = obs
        self.last_info = info or {}
        self.done = False
        self.truncated = False
        self.steps = 0
        self.score = 0.0

    @staticmethod
    def agent_obs(obs: dict) -> dict:
        obs = dict(obs)
        obs["tty_cursor"] = obs["tty_cursor"].astype(np.int64)  # numpy 2: uint8(0) - 1 wraps
        return obs

    def reset(self) -> dict:
        return self.agent_obs(self.first_observation)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(self._index[int(action)])
        self.last_observation, self.last_info = obs, info
        self.steps += 1
        self.score += reward
        self.done = bool(terminated or truncated)
        self.truncated = bool(truncated and not terminated)
        return self.agent_obs(obs), reward, self.done, info

    def get_seeds(self):
        return self.nle.get_seeds()

    def seed(self, core=None, disp=None, reseed=False):
        return self.nle.seed(core, disp, reseed)

    def debug_tiles(self, *args, **kwargs):
        return contextlib.nullcontext()

    def debug_log(self, *args, **kwargs):
        return contextlib.nullcontext()

    def render(self, *args, **kwargs):
        pass


# ---------------------------------------------------------------- end of game parsing

_DEATH_RE = re.compile(r"\bkilled by (.+?)(?:\s+on\s+\S.*)?$|\b(died|starved|choked)\b", re.I)


def screen_text(tty_chars: np.ndarray) -> list[str]:
    return [bytes(row).decode("latin-1").rstrip() for row in np.asarray(tty_chars, dtype=np.uint8)]
