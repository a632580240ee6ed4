"""AutoAscend (NetHack Challenge 2021 winner) as a trajdata expert, on stock nle 1.3.0.

AutoAscend owns its loop: `Agent.main()` calls `env.step(action)` on an old-gym env. `AutoAscendEnv`
is that env, built over the runner's RecordingEnv, so every keypress the agent sends (menu and
--More-- keys included) is a recorded step with the observation it acted on. What AutoAscend needs to
run on nle 1.3.0 is patched here at import time; its fetched source is never edited:

- gymnasium API -> old gym (reset returns obs, step returns 4 values);
- NetHackChallenge's seeding ban undone (`trajdata.envs.nethack.seed_and_reset`);
- `BLStats` gets the 27th blstats field `align`;
- `env._actions` provided; the cursor handed over as int64 (numpy 2: `uint8(0) - 1` wraps);
- NLE's ttyrec recorder stays off (its "Cannot open file" screen breaks the agent's end parser);
- `debug_tiles()`/`debug_log()` are no-ops.

The end of a game is read from NetHack's own xlogfile entry (points, turns, depth, death cause),
falling back to the top-ten screen and to the last live blstats.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trajdata.collectors.base import RecordingEnv
from trajdata.collectors.install import AUTOASCEND_COMMIT, installed_path
from trajdata.collectors.nethack import NetHackExpert
from trajdata.errors import ExpertError

INSTALL_HINT = "trajdata experts install autoascend"


@dataclass
class AutoAscendConfig:
    character: str = "@"  # '@': drawn per episode from its seed; or e.g. "mon-hum-neu-mal"
    fix_moon_phase: bool = True  # luck from the seed, not the real date: reproducible across days
    source: str | None = None  # directory holding the `autoascend` package (default: install cache)
    no_progress_timeout: int = 1000  # NLE ends a game after this many steps without a turn passing (as NLD-AA)
    panic_on_errors: bool = False  # AutoAscend's own option (NLD-AA: off; errors abort the episode)
    agent_seed: int = 0  # AutoAscend's internal RandomState (NLD-AA: 0)


def find_source(path: str | os.PathLike | None = None) -> Path:
    """The directory holding the `autoascend` package: `path`, else the install cache."""
    root = Path(path) if path is not None else installed_path()
    if root is None or not (root / "autoascend" / "agent.py").is_file():
        where = f" at {path}" if path is not None else ""
        raise ExpertError(f"AutoAscend is not installed{where}; run `{INSTALL_HINT}`")
    return root


def import_autoascend(path: str | os.PathLike | None = None):
    """Import `autoascend.agent` from the installed source, patched for nle 1.3.0; returns the module."""
    if "autoascend.agent" in sys.modules:
        return sys.modules["autoascend.agent"]
    root = str(find_source(path))
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, root)
    try:
        with warnings.catch_warnings():  # its regexes have invalid escapes (warned when compiled)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            import autoascend.agent as agent_lib
    except ImportError as e:
        raise ExpertError(f"AutoAscend's dependencies are missing ({e}); run `{INSTALL_HINT}`") from None
    finally:
        sys.path.remove(root)
    fields = agent_lib.BLStats._fields
    if "align" not in fields:
        agent_lib.BLStats = namedtuple("BLStats", fields + ("align",))
    return agent_lib


class AutoAscendEnv:
    """The old-gym env AutoAscend's Agent drives: reset() -> obs, step(action) -> (obs, reward, done, info).

    `env` is a gymnasium NetHackChallenge env (usually a RecordingEnv around it), already reset; `obs`
    is the reset observation. Actions are NLE action enums or their key codes.
    """

    def __init__(self, env, obs: dict, info: dict | None = None):
        self.env = env
        self.nle = env.unwrapped
        self._actions = self.actions = self.nle.actions
        self._index: dict[int, int] = {}
        for i, a in enumerate(self._actions):
            self._index.setdefault(int(a), i)
        self.first_observation = obs
        self.last_observation, self.last_info = obs, info or {}
        self.done = self.truncated = False
        self.steps = 0
        self.score = 0.0

    @staticmethod
    def agent_obs(obs: dict) -> dict:
        obs = dict(obs)
        obs["tty_cursor"] = obs["tty_cursor"].astype(np.int64)
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
        return self.nle.nethack.get_current_seeds()

    def debug_tiles(self, *args, **kwargs):
        return contextlib.nullcontext()

    def debug_log(self, *args, **kwargs):
        return contextlib.nullcontext()

    def render(self, *args, **kwargs):
        pass


def play(env, obs: dict, info: dict | None = None, cfg: AutoAscendConfig | None = None):
    """Let AutoAscend play one already-reset game through `env` until it ends (or `env.step` raises).

    Returns (adapter, agent).
    """
    cfg = cfg or AutoAscendConfig()
    adapter = AutoAscendEnv(env, obs, info)
    agent = import_autoascend(cfg.source).Agent(adapter, seed=cfg.agent_seed, panic_on_errors=cfg.panic_on_errors)
    agent.main()
    return adapter, agent


# ------------------------------------------------------------------------------- end of game

def xlogfile_path(env) -> Path:
    return Path(env.unwrapped.nethack._vardir) / "xlogfile"


def parse_xlog_line(line: str) -> dict:
    """One xlogfile record (`key=value` fields separated by tabs) as a dict."""
    sep = "\t" if "\t" in line else ":"
    return dict(kv.split("=", 1) for kv in line.strip().split(sep) if "=" in kv)


_TOPTEN = re.compile(
    r"(?:\b\d+\s+)?\b(?P<points>\d+)\s+\S+-\w+-\w+-\w+-\w+\s+(?P<how>.+?)\s+on\s+level\s+(?P<depth>\d+)"
    r"(?:\s+\[max\s+(?P<max>\d+)\])?\.(?:\s+(?P<death>[A-Z][^.]*(?:\.\w[^.]*)*)\.)?")


def topten_entry(tty_chars: np.ndarray) -> dict | None:
    """The game's entry in the top-ten list on the final screen (NetHack wraps it at 80 columns)."""
    rows = [bytes(r).decode("latin-1") for r in np.asarray(tty_chars, np.uint8)]
    text = ""
    for r in rows:
        text += r if len(r.rstrip()) == len(r) else r.rstrip() + " "
    m = _TOPTEN.search(" ".join(text.split()))
    if m is None:
        return None
    how = m["how"].split(" in ")[0]
    death = m["death"] or how
    return {"points": int(m["points"]), "deathlev": int(m["depth"]), "maxlvl": int(m["max"] or m["depth"]),
            "death": death[0].lower() + death[1:]}


def game_end(xlog: dict | None, final_screen: np.ndarray | None, last_blstats: np.ndarray) -> dict:
    """Index columns describing how the game ended (best source first: xlogfile, screen, blstats)."""
    from nle import nethack

    bl = [int(x) for x in last_blstats]
    out = {"score": bl[nethack.NLE_BL_SCORE], "turns": bl[nethack.NLE_BL_TIME], "depth": bl[nethack.NLE_BL_DEPTH],
           "max_depth": bl[nethack.NLE_BL_DEPTH], "death": "", "end_source": "blstats"}
    entry = xlog
    if entry is None and final_screen is not None:
        entry = topten_entry(final_screen)
        if entry is not None:
            out["end_source"] = "screen"
    elif entry is not None:
        out["end_source"] = "xlogfile"
    if entry is not None:
        death = entry["death"] + (f", while {entry['while']}" if entry.get("while") else "")
        out.update(score=int(entry["points"]), depth=int(entry["deathlev"]), max_depth=int(entry["maxlvl"]),
                   death=death)
        if "turns" in entry:
            out["turns"] = int(entry["turns"])
    return out


class AutoAscendExpert(NetHackExpert):
    """AutoAscend playing NetHackChallenge-v0; needs `trajdata experts install autoascend`."""

    name = "autoascend"
    version = AUTOASCEND_COMMIT

    def __init__(self, **kwargs):
        self.cfg = AutoAscendConfig(**kwargs)
        super().__init__(self.cfg.character, self.cfg.fix_moon_phase)
        find_source(self.cfg.source)
        self.adapter = self.agent = None
        self._xlog_offset = 0

    def make_env(self):
        import_autoascend(self.cfg.source)
        return super().make_env()

    def reset_env(self, env, seed):
        obs, info, seeds = super().reset_env(env, seed)
        env.unwrapped.no_progress_timeout = self.cfg.no_progress_timeout
        xlog = xlogfile_path(env)
        self._xlog_offset = xlog.stat().st_size if xlog.exists() else 0
        self.adapter = self.agent = None
        return obs, info, seeds

    def run_episode(self, env: RecordingEnv, obs, info, seed) -> None:
        self.adapter = AutoAscendEnv(env, obs, info)
        agent_lib = import_autoascend(self.cfg.source)
        self.agent = agent_lib.Agent(self.adapter, seed=self.cfg.agent_seed, panic_on_errors=self.cfg.panic_on_errors)
        self.agent.main()  # returns when the game is over; caps and errors propagate to the runner

    def _xlog_entry(self, env) -> dict | None:
        path = xlogfile_path(env)
        if not path.exists():
            return None
        with open(path, "rb") as f:
            f.seek(self._xlog_offset)
            lines = f.read().decode("latin-1").strip().splitlines()
        return parse_xlog_line(lines[-1]) if lines else None

    def summary(self, env: RecordingEnv) -> dict:
        from nle import nethack

        out = super().summary(env)
        last_bl = env.writer.last("blstats") if env.steps else env.last_obs["blstats"]
        ended = env.terminated
        end = game_end(self._xlog_entry(env) if ended else None,
                       env.last_obs["tty_chars"] if ended else None, last_bl)
        out.update(end)
        if ended:
            out["end_reason"] = f"{out['end_reason']}: {end['death']}" if end["death"] else out["end_reason"]
        agent = self.agent
        out["panics"] = len(agent.all_panics) if agent is not None else 0
        out["experience_level"] = int(last_bl[nethack.NLE_BL_XP])
        milestone = getattr(getattr(agent, "global_logic", None), "milestone", None)
        out["milestone"] = getattr(milestone, "name", str(milestone or ""))
        return out

    def describe(self) -> dict:
        d = super().describe()
        d.update(commit=AUTOASCEND_COMMIT, no_progress_timeout=self.cfg.no_progress_timeout,
                 panic_on_errors=self.cfg.panic_on_errors, agent_seed=self.cfg.agent_seed)
        return d


def replay_episode(root, episode_id: str) -> int:
    """Replay a recorded NetHack episode's actions on its seeds in a fresh env; returns the steps checked.

    Raises DataError at the first step whose recorded observation differs from the replayed one.
    """
    import json

    from trajdata.envs.nethack import CharacterEnv, seed_and_reset
    from trajdata.errors import DataError
    from trajdata.format.dataset import Dataset

    ds = Dataset(root)
    row = next((r for r in ds.index_rows() if r["id"] == episode_id), None)
    if row is None:
        raise DataError(f"{root}: no episode {episode_id!r}")
    seeds = row["seeds"] if isinstance(row["seeds"], dict) else json.loads(row["seeds"])
    env = CharacterEnv(row["character"], ds.info.get("expert", {}).get("fix_moon_phase", True))
    try:
        obs, _ = seed_and_reset(env, seeds["core"], seeds["disp"], seeds.get("lgen"))
        names = ds.schema.observation_names
        t = 0
        for chunk in ds.episode(episode_id):
            for i in range(chunk.steps):
                for name in names:
                    if not np.array_equal(chunk.fields[name][i], obs[name]):
                        raise DataError(f"{episode_id}: step {t}: recorded {name} differs from the replay")
                obs, *_ = env.step(int(chunk.fields["action"][i]))
                t += 1
        return t
    finally:
        env.close()
