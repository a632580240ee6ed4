"""The collection runner: shards are units of work, workers are processes, each writes whole shards.

``collect(cfg)`` skips shards already on disk (rerunning the same command resumes), runs the others
on a backend (``local`` process pool, or ``ray``), shows tqdm progress with steps/s, and finally
rebuilds ``index.parquet`` from the shards. Episode ``e`` of shard ``s`` always gets the same id
(``SSSSSS-EEEE``) and seed, so a shard redone after a crash holds the same episodes.

Two watchdogs guard each worker: a Python-level stall (``stall_seconds`` without a step) raises
``EpisodeStalled`` and the episode is kept as truncated; a hang SIGALRM cannot interrupt (inside C)
trips the hard backstop (``hard_stall_seconds``), which dumps the stack and exits the worker. A worker
that dies (backstop, segfault, OOM kill) costs only its own shard: the shard is rerun in a fresh worker,
up to ``max_shard_retries`` times, then given up while every other shard completes, and ``collect``
raises one ``ExpertError`` naming the failed shards (a rerun retries them). The local backend gives
each worker its own one-process pool, so a death is attributed to exactly one shard and never
disturbs the other workers. With ``workers=1`` shards run in this process: nothing survives a crash
there, and the hard backstop exits this process.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np

from trajdata.collectors.base import (EpisodeStalled, EpisodeTruncated, Expert, HardWatchdog, RecordingEnv,
                                      install_stall_handler)
from trajdata.errors import ConfigError, ExpertError
from trajdata.format.dataset import SHARD_DIR, build_index, create_or_check, shard_name
from trajdata.format.schema import get_schema
from trajdata.format.codec import DEFAULT_PROFILE, PROFILES
from trajdata.format.shard import DEFAULT_CHUNK_STEPS, ShardWriter

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ExpertSpec:
    """What to instantiate in each worker: ``target`` is ``"module:Class"``."""

    target: str
    kwargs: dict = field(default_factory=dict)

    def build(self) -> Expert:
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

    def check(self) -> None:
        for name in ("shards", "episodes_per_shard", "workers", "chunk_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.max_shard_retries < 0:
            raise ConfigError(f"--max-shard-retries must be at least 0 (got {self.max_shard_retries})")
        hard = self.hard_seconds()
        if self.hard_stall_seconds is not None and self.hard_stall_seconds < 0:
            raise ConfigError(f"--hard-stall-seconds must be 0 (off) or positive (got {self.hard_stall_seconds:g})")
        if hard and self.stall_seconds and hard < 2 * self.stall_seconds:
            raise ConfigError(f"--hard-stall-seconds ({hard:g}) must be at least twice --stall-seconds "
                              f"({self.stall_seconds:g}), or 0 (off)")
        if self.codec not in PROFILES:
            raise ConfigError(f"--codec {self.codec!r}: choose one of {', '.join(PROFILES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")

    def hard_seconds(self) -> float:
        """The hard backstop's timeout: ``hard_stall_seconds``, else max(2 * stall, stall + 30); 0 = off."""
        if self.hard_stall_seconds is not None:
            return float(self.hard_stall_seconds)
        return max(2 * self.stall_seconds, self.stall_seconds + 30) if self.stall_seconds else 0.0


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


def run_shard(cfg: CollectConfig, shard: int, report: Callable[[int], None] | None = None) -> list[dict]:
    """Play ``cfg.episodes_per_shard`` episodes into shard ``shard``; returns their index rows."""
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
        with ShardWriter(path, schema, cfg.chunk_steps, cfg.codec) as sw:
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


def _shard_worker(cfg: CollectConfig, shard: int, q) -> list[dict]:
    return run_shard(cfg, shard, report=(lambda n: q.put((shard, n))) if q is not None else None)


def pending_shards(cfg: CollectConfig) -> list[int]:
    shard_dir = Path(cfg.out) / SHARD_DIR
    return [i for i in range(cfg.shards) if not (shard_dir / shard_name(i)).exists()]


WORKER_DIED = "worker died {n} times (crash, out of memory or hang)"


def _run_local(cfg: CollectConfig, todo: list[int], on_steps: Callable[[int], None],
               on_shard: Callable[[int, list], None]) -> dict[int, str]:
    """Run the shards in ``todo``; returns {shard: why it failed} for shards given up on."""
    if cfg.workers == 1:
        for s in todo:
            on_shard(s, run_shard(cfg, s, report=on_steps))
        return {}
    ctx = get_context("spawn")
    with _one_thread_per_worker():
        return _run_pools(cfg, ctx, todo, on_steps, on_shard)


THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@contextlib.contextmanager
def _one_thread_per_worker():
    """Workers are one per core: keep BLAS/OpenMP/numba pools in them to one thread (spawned
    processes inherit the environment; a value the user set is kept)."""
    added = [k for k in THREAD_ENV if k not in os.environ]
    os.environ.update({k: "1" for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run_pools(cfg: CollectConfig, ctx, todo: list[int], on_steps, on_shard) -> dict[int, str]:
    todo, deaths, failed, live = list(todo), {}, {}, {}
    idle: list[ProcessPoolExecutor | None] = [None] * min(cfg.workers, len(todo))
    pools, running = [], {}

    def steps(item) -> None:
        s, n = item
        live[s] = live.get(s, 0) + n
        on_steps(n)

    def new_pool() -> ProcessPoolExecutor:
        pools.append(ProcessPoolExecutor(max_workers=1, mp_context=ctx))
        return pools[-1]

    with ctx.Manager() as manager:
        q = manager.Queue()
        try:
            while todo or running:
                while todo and idle:
                    pool, s = idle.pop() or new_pool(), todo.pop(0)
                    try:
                        fut = pool.submit(_shard_worker, cfg, s, q)
                    except BrokenProcessPool:  # its worker died while idle
                        pool.shutdown(wait=False)
                        pool = new_pool()
                        fut = pool.submit(_shard_worker, cfg, s, q)
                    running[fut] = (pool, s)
                done, _ = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(q, steps)
                for fut in done:
                    pool, s = running.pop(fut)
                    try:
                        rows = fut.result()
                    except BrokenProcessPool:
                        pool.shutdown(wait=False)
                        idle.append(None)
                        on_steps(-live.pop(s, 0))
                        deaths[s] = deaths.get(s, 0) + 1
                        if deaths[s] > cfg.max_shard_retries:
                            failed[s] = WORKER_DIED.format(n=deaths[s])
                        else:
                            todo.append(s)
                        continue
                    idle.append(pool)
                    live.pop(s, None)
                    on_shard(s, rows)
            _drain(q, steps)
        finally:
            for fut in running:
                fut.cancel()
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
    return failed


def _drain(q, on_item) -> None:
    while True:
        try:
            on_item(q.get_nowait())
        except queue.Empty:
            return


def failure_message(failed: dict[int, str]) -> str:
    """One line naming the failed shards, grouped by why they failed."""
    by_reason: dict[str, list[int]] = {}
    for s, why in sorted(failed.items()):
        by_reason.setdefault(why, []).append(s)
    parts = [f"shard{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))} failed: {why}" for why, ss in by_reason.items()]
    return "; ".join(parts) + "; finished shards are kept, rerun to retry them"


def collect(cfg: CollectConfig, progress: bool = True) -> dict:
    """Collect ``cfg.shards`` shards into ``cfg.out`` (resuming); returns a summary dict."""
    cfg.check()
    expert = cfg.expert.build()
    info = {
        "schema": expert.schema,
        "env": expert.describe().get("env", ""),
        "expert": expert.describe(),
        "collection": {"seed": cfg.seed, "episodes_per_shard": cfg.episodes_per_shard, "max_steps": cfg.max_steps,
                       "max_seconds": cfg.max_seconds, "chunk_steps": cfg.chunk_steps, "codec": cfg.codec},
        "packages": package_versions(),
    }
    expert.close()
    create_or_check(cfg.out, info)
    todo = pending_shards(cfg)
    skipped = cfg.shards - len(todo)
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"collect {cfg.expert.target.rpartition(':')[2]}", unit="shard",
               disable=None if progress else True, dynamic_ncols=True)
    stats = {"live": 0, "steps": 0, "episodes": 0, "t0": time.monotonic()}

    def on_steps(n: int) -> None:
        stats["live"] += n
        dt = max(time.monotonic() - stats["t0"], 1e-9)
        bar.set_postfix(steps=stats["live"], steps_s=f"{stats['live'] / dt:,.0f}", refresh=False)
        bar.refresh()

    def on_shard(s: int, rows: list) -> None:
        # Totals come from the shard's own rows: live progress reports are best-effort (a Ray task's
        # last report may arrive after the driver's last poll, and a retried task reports twice).
        stats["episodes"] += len(rows)
        stats["steps"] += sum(int(r["steps"]) for r in rows)
        bar.update(1)

    try:
        if cfg.backend == "ray":
            from trajdata.collectors.ray_backend import run_ray

            failed = run_ray(cfg, todo, on_steps, on_shard)
        else:
            failed = _run_local(cfg, todo, on_steps, on_shard)
    finally:
        bar.close()
    table = build_index(cfg.out)
    if failed:
        raise ExpertError(failure_message(failed))
    elapsed = time.monotonic() - stats["t0"]
    return {"out": cfg.out, "shards_written": len(todo), "shards_skipped": skipped,
            "episodes_written": stats["episodes"], "steps_written": stats["steps"],
            "episodes_total": table.num_rows, "seconds": round(elapsed, 2),
            "steps_per_second": round(stats["steps"] / max(elapsed, 1e-9), 1), "config": asdict(cfg)}
