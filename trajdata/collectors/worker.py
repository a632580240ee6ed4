"""One shard of a collection, as a worker process (local or Ray) runs it, and the config it runs under.

``run_shard(cfg, s)`` plays shard ``s``'s episodes with the expert of ``cfg`` and writes the shard
atomically. Episode ``e`` of shard ``s`` always gets the same id (``SSSSSS-EEEE``) and seed, so a shard
redone after a crash holds the same episodes. A Python-level stall (``stall_seconds`` without a step)
raises ``EpisodeStalled`` and the episode is kept as truncated; a hang SIGALRM cannot interrupt (inside
C) trips the hard backstop (``hard_stall_seconds``), which dumps the stack and exits the worker.
"""
from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import Callable

import numpy as np

from trajdata.collectors.base import (EpisodeStalled, EpisodeTruncated, Expert, HardWatchdog, RecordingEnv,
                                      install_stall_handler)
from trajdata.collectors.config import CollectConfig, ExpertSpec
from trajdata.format.dataset import SHARD_DIR, shard_name
from trajdata.format.schema import get_schema
from trajdata.format.shard import ShardWriter

def episode_seed(base: int, shard: int, episode: int) -> int:
    return int(np.random.SeedSequence([base, shard, episode]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def package_versions(names=("trajdata", "numpy", "zstandard", "nle", "ale-py", "stable-baselines3", "torch")) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


_worker_cache: dict = {}


def _expert_and_env(spec: ExpertSpec):
    if _worker_cache.get("spec") != spec:
        _worker_cache.clear()
        expert = spec.build()
        _worker_cache.update(spec=spec, expert=expert, env=expert.make_env())
    return _worker_cache["expert"], _worker_cache["env"]


def _fresh_env():
    env = _worker_cache.pop("env", None)
    if env is not None:
        try:
            env.close()
        except Exception:
            pass
    _worker_cache["env"] = _worker_cache["expert"].make_env()
    return _worker_cache["env"]


def run_shard(cfg: CollectConfig, shard: int, report: Callable[[int], None] | None = None,
              before_commit: Callable[[], None] | None = None) -> list[dict]:
    """Play ``cfg.episodes_per_shard`` episodes into shard ``shard``; returns their index rows
    (``before_commit`` is called just before the finished shard is renamed into place; raising discards it)."""
    import threading

    if threading.current_thread() is threading.main_thread() and cfg.stall_seconds:
        install_stall_handler()
    expert, env = _expert_and_env(cfg.expert)
    schema = get_schema(expert.schema)
    path = Path(cfg.out) / SHARD_DIR / shard_name(shard)
    versions = package_versions()
    backstop = HardWatchdog(cfg.hard_seconds())
    rows = []
    try:
        with ShardWriter(path, schema, cfg.chunk_steps, cfg.codec, before_commit=before_commit) as sw:
            for ep in range(cfg.episodes_per_shard):
                backstop.kick(force=True)
                seed = episode_seed(cfg.seed, shard, ep)
                t0 = time.monotonic()
                obs, info, seeds = expert.reset_env(env, seed)
                meta = {"seed": seed, "seeds": seeds, "expert": expert.name, "expert_version": expert.version,
                        "env": expert.describe().get("env", ""), "env_version": versions.get(_env_package(expert), ""),
                        "packages": versions, "collection_date": time.strftime("%Y-%m-%d")}
                ew = sw.episode(f"{shard:06d}-{ep:04d}", meta)
                rec = RecordingEnv(env, expert, ew, cfg.max_steps, cfg.max_seconds, cfg.stall_seconds, backstop)
                rec.start(obs, info)
                status, reason, broken = "complete", None, False
                try:
                    if report is None:
                        expert.run_episode(rec, obs, info, seed)
                    else:
                        _run_with_reports(expert, rec, obs, info, seed, report)
                    if rec.truncated:
                        status, reason = "truncated", "env_truncated"
                except EpisodeTruncated as e:
                    status, reason = "truncated", e.reason
                except EpisodeStalled:
                    status, reason = "truncated", f"stalled ({cfg.stall_seconds:g}s without a step)"
                    broken = True
                except Exception as e:
                    status, reason, broken = "aborted", _one_line(e), True
                finally:
                    rec.disarm()
                try:
                    summary = expert.summary(rec)
                except Exception as e:
                    summary = {"summary_error": _one_line(e)}
                if reason is not None:
                    summary["end_reason"] = reason if status != "complete" else summary.get("end_reason")
                summary.update(status=status, wall_seconds=round(time.monotonic() - t0, 3), **{"return": rec.episode_return})
                rows.append(ew.close(summary))
                if broken:
                    backstop.kick(force=True)
                    env = _fresh_env()
    finally:
        backstop.cancel()
    return [dict(r, shard=path.name) for r in rows]


def _env_package(expert: Expert) -> str:
    return {"nethack": "nle", "atari": "ale-py"}.get(expert.schema, "")


def _run_with_reports(expert, rec: RecordingEnv, obs, info, seed, report) -> None:
    """Run the episode, reporting step counts about once a second (wraps ``rec.step``)."""
    state = {"last": time.monotonic(), "sent": 0}
    inner = rec.step

    def step(action):
        out = inner(action)
        now = time.monotonic()
        if now - state["last"] > 0.5:
            report(rec.steps - state["sent"])
            state.update(last=now, sent=rec.steps)
        return out

    rec.step = step
    try:
        expert.run_episode(rec, obs, info, seed)
    finally:
        if rec.steps > state["sent"]:
            report(rec.steps - state["sent"])


WORKER_DIED = "worker died {n} times (crash, out of memory or hang)"
