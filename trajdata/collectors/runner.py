"""The collection runner: shards are units of work, workers are processes, each writes whole shards.

``collect(cfg)`` skips shards already on disk (rerunning the same command resumes), runs the others
on a backend (``local`` process pool, or ``ray``), shows tqdm progress with steps/s, and finally
rebuilds ``index.parquet`` from the shards. What a worker does with one shard is ``worker.run_shard``.

A worker that dies (backstop, segfault, OOM kill) costs only its own shard: the shard is rerun in a fresh worker,
up to ``max_shard_retries`` times, then given up while every other shard completes, and ``collect``
raises one ``ExpertError`` naming the failed shards (a rerun retries them). The local backend gives
each worker its own one-process pool, so a death is attributed to exactly one shard and never
disturbs the other workers. With ``workers=1`` shards run in this process: nothing survives a crash
there, and the hard backstop exits this process.
"""
from __future__ import annotations

import contextlib
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from trajdata.collectors.config import BACKENDS, CollectConfig, ExpertSpec
from trajdata.collectors.worker import WORKER_DIED, episode_seed, package_versions, run_shard
from trajdata.errors import ExpertError
from trajdata.format.dataset import SHARD_DIR, build_index, create_or_check, shard_name

__all__ = ["BACKENDS", "CollectConfig", "ExpertSpec", "WORKER_DIED", "collect", "episode_seed", "failure_message",
           "pending_shards"]


def _shard_worker(cfg: CollectConfig, shard: int, q) -> list[dict]:
    return run_shard(cfg, shard, report=(lambda n: q.put((shard, n))) if q is not None else None)


def pending_shards(cfg: CollectConfig) -> list[int]:
    shard_dir = Path(cfg.out) / SHARD_DIR
    return [i for i in range(cfg.shards) if not (shard_dir / shard_name(i)).exists()]


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
    written: list[dict] = []

    def on_steps(n: int) -> None:
        stats["live"] += n
        dt = max(time.monotonic() - stats["t0"], 1e-9)
        bar.set_postfix(steps=stats["live"], steps_s=f"{stats['live'] / dt:,.0f}", refresh=False)
        bar.refresh()

    def on_shard(s: int, rows: list) -> None:
        # Totals come from the shard's own rows: live progress reports are best-effort (a Ray task's
        # last report may arrive after the driver's last poll, and a retried task reports twice).
        stats["episodes"] += len(rows)
        written.extend(rows)  # their wall-clock columns, which shards do not store, go to the index
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
    table = build_index(cfg.out, wall_clock=written)
    if failed:
        raise ExpertError(failure_message(failed))
    elapsed = time.monotonic() - stats["t0"]
    return {"out": cfg.out, "shards_written": len(todo), "shards_skipped": skipped,
            "episodes_written": stats["episodes"], "steps_written": stats["steps"],
            "episodes_total": table.num_rows, "seconds": round(elapsed, 2),
            "steps_per_second": round(stats["steps"] / max(elapsed, 1e-9), 1), "config": asdict(cfg)}
