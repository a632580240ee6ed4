"""One unit of evaluation work, as a worker process (local or Ray) runs it.

Envs are made, seeded, reset and summarised by collector ``Expert`` objects (the *hosts*), exactly as
``collect`` does: NetHack through ``NetHackExpert`` (NetHackChallenge-v0, the character drawn from the
episode seed for '@', seeds from ``seeds_from``, the start-time pin), Atari through
``make_play_env`` with the dataset's no-op and frame-skip settings. An expert under evaluation is its
own host (``ScriptedExpert``, ``PPOExpert``, ``AutoAscendExpert``); BC and random policies use
``NetHackHost`` / ``AtariHost``. Every step goes through a ``RecordingEnv``, which with ``--record``
writes the step into the episode's shard.

A unit (``UnitSpec``) is a fixed list of (index, seed) episodes played by ``lanes`` envs: each lane
takes the next episode of the unit's queue as soon as its current one ends, so which episode runs
beside which depends only on the unit, never on the worker or how many workers there are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trajdata.collectors.atari import AtariGame
from trajdata.collectors.base import EpisodeTruncated, Expert, RecordingEnv
from trajdata.collectors.config import ExpertSpec
from trajdata.collectors.nethack import NetHackExpert
from trajdata.envs.atari import env_id
from trajdata.envs.nethack import CharacterEnv


@dataclass(frozen=True)
class PolicySpec:
    """What acts: ``kind`` "bc" (``checkpoint``), "random", or "expert" (the hosts act themselves)."""

    kind: str
    checkpoint: str | None = None
    greedy: bool = False
    temperature: float = 1.0
    context: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class UnitSpec:
    host: ExpertSpec
    policy: PolicySpec
    episodes: tuple  # ((index, seed), ...)
    lanes: int
    max_steps: int
    threads: int = 1
    record: str | None = None
    record_chunk_steps: int = 1024
    record_meta: dict = field(default_factory=dict)


class NetHackHost(NetHackExpert):
    """NetHack env plumbing for a BC or random policy: ``NetHackExpert`` without a policy of its own."""

    name, version = "eval-host", "1"

    def __init__(self, character: str = "@", fix_moon_phase: bool = True, no_progress_timeout: int | None = None):
        super().__init__(character, fix_moon_phase)
        self.no_progress_timeout = no_progress_timeout

    def reset_env(self, env, seed):
        out = super().reset_env(env, seed)
        if self.no_progress_timeout is not None:
            env.unwrapped.no_progress_timeout = self.no_progress_timeout
        return out


class RLHost(NetHackHost):
    """NetHack env plumbing for an RL snapshot: ``NetHackHost`` on the NLE task it was trained on."""

    def __init__(self, env_id: str = "NetHackScore-v0", character: str = "mon-hum-neu-mal",
                 fix_moon_phase: bool = True, no_progress_timeout: int | None = None):
        super().__init__(character, fix_moon_phase, no_progress_timeout)
        self.env_id = env_id

    def make_env(self) -> CharacterEnv:
        character = self.character if self.character != "@" else "val-hum-law-fem"
        return CharacterEnv(character, self.fix_moon_phase, self.env_id)

    def describe(self) -> dict:
        return dict(super().describe(), env=self.env_id)


class AtariHost(AtariGame):
    """Atari env plumbing for a BC or random policy: ``AtariGame`` without a policy of its own."""

    name, version = "eval-host", "1"

    def describe(self) -> dict:
        return {"name": self.name, "env": env_id(self.game), "game": self.game, "noop_max": self.noop_max,
                "frame_skip": self.frame_skip}


class NullWriter:
    """An ``EpisodeWriter`` that keeps only the last step (what ``Expert.summary`` reads)."""

    def __init__(self):
        self._last: dict = {}

    def append(self, fields: dict, action=None) -> None:
        self._last = {k: np.array(v) for k, v in fields.items()}

    def set_outcome(self, reward, done) -> None:
        pass

    def last(self, name: str):
        return self._last[name]


def owns_loop(host) -> bool:
    return type(host).run_episode is not Expert.run_episode


# ---- per-process cache: the loaded policy and the lanes' hosts/envs survive from unit to unit ------

_cache: dict = {"lanes": [], "host": None, "policy_key": None, "policy": None}


def _lanes(spec: ExpertSpec, n: int) -> list:
    if _cache["host"] != spec:
        for host, env in _cache["lanes"]:
            _close(host, env)
        _cache.update(host=spec, lanes=[])
    while len(_cache["lanes"]) < n:
        host = spec.build()
        _cache["lanes"].append((host, host.make_env()))
    return _cache["lanes"][:n]


def _close(host, env) -> None:
    for f in (env.close, host.close):
        try:
            f()
        except Exception:
            pass


def _policy(spec: PolicySpec, n_actions: int):
    from trajdata.evaluate.policy import BCPolicy, RandomPolicy

    key = (spec, n_actions)
    if _cache["policy_key"] != key:
        if spec.kind == "bc":
            from trajdata.train.checkpoint import load_model

            model, ckpt = load_model(spec.checkpoint, spec.device)
            if model.cfg.n_actions != n_actions:
                from trajdata.errors import ConfigError

                raise ConfigError(f"checkpoint {spec.checkpoint} has {model.cfg.n_actions} actions; "
                                  f"the env has {n_actions}: it was trained on another env")
            policy = BCPolicy(model, ckpt, spec.greedy, spec.temperature, spec.device, spec.context)
        elif spec.kind == "random":
            policy = RandomPolicy(n_actions)
        else:
            policy = None
        _cache.update(policy_key=key, policy=policy)
    return _cache["policy"]


def release() -> None:
    """Close the cached envs (end of an in-process evaluation)."""
    for host, env in _cache["lanes"]:
        _close(host, env)
    _cache.update(lanes=[], host=None, policy_key=None, policy=None)


# ---- one episode's bookkeeping --------------------------------------------------------------------

class Episode:
    def __init__(self, unit: UnitSpec, lane: int, host, env, index: int, seed: int):
        self.unit, self.lane, self.host, self.env, self.index, self.seed = unit, lane, host, env, index, seed
        self.t0 = time.monotonic()
        obs, info, seeds = host.reset_env(env, seed)
        self.seeds = seeds
        self.nethack = host.schema == "nethack"
        self.xlog_offset = _xlog_size(env) if self.nethack else 0
        self.shard = None
        if unit.record:
            writer = self._open_record()
        else:
            writer = NullWriter()
        self.rec = RecordingEnv(env, host, writer, max_steps=unit.max_steps)
        self.rec.start(obs, info)
        self.obs, self.info = obs, info
        self.status, self.reason = "complete", None

    def _open_record(self):
        from trajdata.collectors.worker import package_versions
        from trajdata.format.dataset import SHARD_DIR, shard_name
        from trajdata.format.schema import get_schema
        from trajdata.format.shard import ShardWriter

        path = Path(self.unit.record) / SHARD_DIR / shard_name(self.index)
        self.shard = ShardWriter(path, get_schema(self.host.schema), self.unit.record_chunk_steps).__enter__()
        versions = package_versions()
        meta = dict(self.unit.record_meta, seed=self.seed, seeds=self.seeds, packages=versions,
                    collection_date=time.strftime("%Y-%m-%d"))
        return self.shard.episode(f"{self.index:06d}-0000", meta)

    def fields(self) -> dict:
        return self.host.step_fields(self.obs, self.info)

    def step(self, action: int) -> bool:
        """Play ``action``; True when the episode is over (ended, or its step cap reached)."""
        obs, _, term, trunc, info = self.rec.step(action)
        self.obs, self.info = obs, info
        if term:
            return True
        if trunc:
            self.status, self.reason = "truncated", "env_truncated"
            return True
        if self.rec.steps >= self.unit.max_steps:
            self.status, self.reason = "truncated", f"max_steps ({self.unit.max_steps})"
            return True
        return False

    def run_owned(self) -> None:
        """Let a loop-owning expert (AutoAscend) play the whole episode."""
        try:
            self.host.run_episode(self.rec, self.obs, self.info, self.seed)
            if self.rec.truncated:
                self.status, self.reason = "truncated", "env_truncated"
        except EpisodeTruncated as e:
            self.status, self.reason = "truncated", e.reason
        self.obs, self.info = self.rec.last_obs, self.rec.last_info

    def finish(self) -> dict:
        summary = self.host.summary(self.rec)
        if self.nethack:
            summary = dict(summary, **_nethack_end(self.env, self.rec, self.xlog_offset, summary))
        if self.reason is not None:
            summary["end_reason"] = self.reason
        summary.update(status=self.status, wall_seconds=round(time.monotonic() - self.t0, 3),
                       **{"return": self.rec.episode_return})
        if self.shard is not None:
            row = self.rec.writer.close(summary)
            self.shard.__exit__(None, None, None)
            self.shard = None
            summary = dict(summary, recorded=row["id"])
        keep = ("return", "steps", "status", "end_reason", "score", "turns", "depth", "max_depth", "death",
                "character", "lives_left", "wall_seconds", "recorded")
        out = {"index": self.index, "seed": self.seed, "seeds": self.seeds, "steps": self.rec.steps}
        out.update({k: summary[k] for k in keep if k in summary and k != "steps"})
        return out

    def abort(self, exc: BaseException) -> None:
        if self.shard is not None:
            self.shard.__exit__(type(exc), exc, None)
            self.shard = None


def _xlog_size(env) -> int:
    from trajdata.collectors.autoascend import xlogfile_path

    p = xlogfile_path(env)
    return p.stat().st_size if p.exists() else 0


def _nethack_end(env, rec: RecordingEnv, offset: int, summary: dict) -> dict:
    """Depth (NLE_BL_DEPTH), turns and, for a finished game, the death cause from NetHack's xlogfile."""
    from trajdata.collectors.autoascend import game_end, parse_xlog_line, xlogfile_path

    if "death" in summary:  # AutoAscendExpert already read it
        return {}
    xlog = None
    if rec.terminated:
        p = xlogfile_path(env)
        if p.exists():
            with open(p, "rb") as f:
                f.seek(offset)
                lines = f.read().decode("latin-1").strip().splitlines()
            xlog = parse_xlog_line(lines[-1]) if lines else None
    last_bl = rec.writer.last("blstats") if rec.steps else rec.last_obs["blstats"]
    end = game_end(xlog, rec.last_obs["tty_chars"] if rec.terminated else None, last_bl)
    out = {k: end[k] for k in ("turns", "depth", "max_depth", "death")}
    if rec.terminated and end["death"]:
        out["end_reason"] = f"{summary.get('end_reason', 'death')}: {end['death']}"
    return out


# ---- a unit ---------------------------------------------------------------------------------------

def run_unit(unit: UnitSpec, report=None) -> list[dict]:
    """Play every episode of ``unit``; returns their results (ordered by index). ``report(result)`` is
    called as each episode ends."""
    import torch

    torch.set_num_threads(unit.threads)
    queue = list(unit.episodes)
    n = min(unit.lanes, len(queue))
    lanes = _lanes(unit.host, n)
    host0, env0 = lanes[0]
    results = []

    def done(ep: Episode) -> None:
        r = ep.finish()
        results.append(r)
        if report is not None:
            report(r)

    if owns_loop(host0):
        for index, seed in queue:  # one env: the expert drives it
            ep = Episode(unit, 0, host0, env0, index, seed)
            try:
                ep.run_owned()
            except BaseException as e:
                ep.abort(e)
                raise
            done(ep)
        return sorted(results, key=lambda r: r["index"])

    policy = _policy(unit.policy, int(env0.action_space.n)) if unit.policy.kind != "expert" else None
    if policy is not None:
        policy.start(n)
    active: dict[int, Episode] = {}

    def start(lane: int) -> None:
        index, seed = queue.pop(0)
        host, env = lanes[lane]
        ep = Episode(unit, lane, host, env, index, seed)
        if policy is not None:
            policy.begin(lane, seed)
        else:
            host.begin(ep.obs, seed)
        active[lane] = ep

    try:
        for lane in range(n):
            start(lane)
        while active:
            order = sorted(active)
            eps = [active[lane] for lane in order]
            if policy is not None:
                actions = policy.act(order, [ep.fields() for ep in eps])
            else:
                actions = [ep.host.act(ep.obs) for ep in eps]
            for lane, ep, a in zip(order, eps, actions):
                if ep.step(a):
                    del active[lane]
                    done(ep)
                    if queue:
                        start(lane)
    except BaseException as e:
        for ep in active.values():
            ep.abort(e)
        raise
    return sorted(results, key=lambda r: r["index"])
