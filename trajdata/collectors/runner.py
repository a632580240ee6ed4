"""The collection runner: shards are units of work, workers are processes, each writes whole shards.

``collect(cfg)`` skips shards already on disk (rerunning the same command resumes), runs the others
on a backend (``local`` process pool, or ``ray``), shows tqdm progress with steps/s, and finally
rebuilds ``index.parquet`` from the shards. What a worker does with one shard is ``worker.run_shard``.

A worker that dies (backstop, segfault, OOM kill) costs only its own shard: the shard is rerun in a fresh worker,
up to ``max_shard_retries`` times, then given up while every other shard completes, and ``collect``
raises one ``ExpertError`` naming the failed shards (a rerun retries them).

One collect at a time per ``--out`` (a lock the kernel drops when its holder dies: a second collect
is refused naming the holder's pid, a killed one never blocks a rerun). Worker processes die with
the collect (``PR_SET_PDEATHSIG``, and a parent-pid poll) and never rename a shard after it is gone;
Ctrl-C and SIGTERM stop them and remove their partial shards. On resume, partial shards of a killed
run are removed and a finished shard that is not a whole tar (truncated) is collected again. The local backend gives
each worker its own one-process pool, so a death is attributed to exactly one shard and never
disturbs the other workers. With ``workers=1`` shards run in this process: nothing survives a crash
there, and the hard backstop exits this process.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import sys
import tarfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from trajdata.collectors.config import BACKENDS, CollectConfig, ExpertSpec
from trajdata.collectors.worker import WORKER_DIED, episode_seed, package_versions, run_shard
from trajdata.errors import DataError, ExpertError
from trajdata.format.dataset import (DATASET_JSON, FORMAT_NAME, INDEX_FILE, SHARD_DIR, build_index, create_or_check,
                                     shard_name)

__all__ = ["BACKENDS", "CollectConfig", "ExpertSpec", "WORKER_DIED", "collect", "episode_seed", "failure_message",
           "pending_shards"]


def _shard_worker(cfg: CollectConfig, shard: int, q) -> list[dict]:
    return run_shard(cfg, shard, report=(lambda n: q.put((shard, n))) if q is not None else None,
                     before_commit=_check_parent)


# ---- worker processes die with the collect that started them ----------------------------------------

_parent: dict = {}
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Initializer of every process the local backend starts (workers, the progress-queue manager):
    the kernel kills it when ``parent`` dies (Linux ``PR_SET_PDEATHSIG``), and a thread polling the
    parent pid exits it where that is not available."""
    _parent["pid"] = parent
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="trajdata-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _check_parent() -> None:
    """Called just before a worker renames its finished shard: never after the collect is gone."""
    if _parent and os.getppid() != _parent["pid"]:
        raise ExpertError("the collect that started this worker is gone; shard discarded")


@contextlib.contextmanager
def no_sigint_in_children():
    """Start processes with SIGINT blocked (the mask is inherited): Ctrl-C reaches only this process,
    which stops the workers itself, instead of every starting worker printing a KeyboardInterrupt
    traceback. A Ctrl-C or SIGTERM meanwhile is held (a process half started would be orphaned) and
    raised when the block ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # starting it later would unblock SIGINT (it blocks and unblocks it)
    held: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if held:
            signal.raise_signal(held[0])


def _kill_pools(pools: list[ProcessPoolExecutor]) -> None:
    procs = [p for pool in pools for p in list((getattr(pool, "_processes", None) or {}).values())]
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(10)


# ---- one collect per --out, finished shards checked on resume -------------------------------------

LOCK_FILE = "collect.lock"


def lock_out(out: Path, lock_file: str = LOCK_FILE, busy: str = "being collected into by another collect"):
    """Hold an exclusive lock on ``out/collect.lock`` (released by the kernel when this process dies,
    so a killed collect never blocks a rerun); a second collect into ``out`` is refused naming the
    holder. Other commands lock their --out with their own ``lock_file`` and ``busy`` message."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / lock_file
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().split()
        f.close()
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        raise DataError(f"{out} is {busy} ({who}); "
                        f"wait for it to finish or use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
    f.flush()
    return f


def _remove_stale_tmp(out: Path) -> None:
    """Partial shards (and index / dataset.json temp files) of a killed collect: this one holds the
    lock, nobody else is writing them."""
    for p in [*(out / SHARD_DIR).glob("shard-*.tar.tmp"), out / (INDEX_FILE + ".tmp"), out / (DATASET_JSON + ".tmp")]:
        p.unlink(missing_ok=True)


def shard_problem(path: Path) -> str | None:
    """Why the finished shard ``path`` is not a whole tar of whole members (None if it is): walks the
    member headers only, so it is cheap."""
    size = path.stat().st_size
    if size < 2 * tarfile.BLOCKSIZE or size % tarfile.BLOCKSIZE:
        return f"{size} bytes, not whole tar blocks"
    with open(path, "rb") as f:
        off = 0
        while True:
            f.seek(off)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                return f"{size} bytes, ends inside member data"
            if block == tarfile.NUL * tarfile.BLOCKSIZE:
                tail = block + f.read()
                if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(tarfile.NUL):
                    return f"{size} bytes, no end-of-archive marker"
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                return f"{size} bytes, bad member header at byte {off}"
            off += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if off > size:
                return f"{size} bytes, member {info.name} cut short"


def _redo_broken_shards(cfg: CollectConfig) -> None:
    shard_dir = Path(cfg.out) / SHARD_DIR
    for i in range(cfg.shards):
        path = shard_dir / shard_name(i)
        if path.exists():
            why = shard_problem(path)
            if why is not None:
                print(f"trajdata: warning: {path} is truncated ({why}); collecting it again", file=sys.stderr)
                path.unlink()


def _replace_unfinished(out: Path, info: dict) -> None:
    """A collect that finished no shard leaves settings that bind nothing: a corrected rerun replaces them."""
    path = out / DATASET_JSON
    if not path.is_file() or any((out / SHARD_DIR).glob("shard-*.tar")):
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return
    if not isinstance(old, dict) or old.get("format") != FORMAT_NAME:
        return
    canon = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
    changed = [k for k in ("schema", "expert", "collection") if canon(old.get(k)) != canon(info.get(k))]
    if changed:
        path.unlink()
        (out / INDEX_FILE).unlink(missing_ok=True)
        print(f"trajdata: note: {out} has no finished shard: its settings ({', '.join(changed)}) are replaced "
              f"by this collect's", file=sys.stderr)


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
    with threads_env(1):  # workers are one per core
        return _run_pools(cfg, ctx, todo, on_steps, on_shard)


THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@contextlib.contextmanager
def threads_env(n: int):
    """Processes started inside keep their BLAS/OpenMP/numba pools to ``n`` threads (spawned
    processes inherit the environment; a value the user set is kept)."""
    added = [k for k in THREAD_ENV if k not in os.environ]
    os.environ.update({k: str(n) for k in added})
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
        pools.append(ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_die_with_parent,
                                         initargs=(os.getpid(),)))
        return pools[-1]

    def submit(pool, s):
        with no_sigint_in_children():  # the worker process starts at its first submit
            return pool.submit(_shard_worker, cfg, s, q)

    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=ctx)
    with no_sigint_in_children():
        manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        with manager:
            q = manager.Queue()
            try:
                while todo or running:
                    while todo and idle:
                        pool, s = idle.pop() or new_pool(), todo.pop(0)
                        try:
                            fut = submit(pool, s)
                        except BrokenProcessPool:  # its worker died while idle
                            pool.shutdown(wait=False)
                            pool = new_pool()
                            fut = submit(pool, s)
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
            except BaseException:  # Ctrl-C, SIGTERM, a worker's error: stop the other workers now
                _kill_pools(pools)
                for _, s in running.values():
                    (Path(cfg.out) / SHARD_DIR / (shard_name(s) + ".tmp")).unlink(missing_ok=True)
                for pool in pools:
                    pool.shutdown(wait=False, cancel_futures=True)
                raise
            finally:
                for fut in running:
                    fut.cancel()
                for pool in pools:
                    pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:  # the queue's manager too (it is started even before the first worker)
        with contextlib.suppress(Exception):
            manager._process.kill()
        raise
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
    lock = lock_out(Path(cfg.out))
    try:
        return _collect_locked(cfg, info, progress)
    finally:
        lock.close()


def _collect_locked(cfg: CollectConfig, info: dict, progress: bool) -> dict:
    out = Path(cfg.out)
    _replace_unfinished(out, info)
    create_or_check(cfg.out, info)
    _remove_stale_tmp(out)
    _redo_broken_shards(cfg)
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
