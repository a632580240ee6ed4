"""Ray backend for the collection runner: the same per-shard function (`runner.run_shard`), as Ray tasks.

Output is identical to the local backend: each task writes one whole shard under `cfg.out`, so on a
multi-node cluster `--out` must be on a filesystem every node sees. At most `cfg.workers` shards run
at once. Without `--ray-address` a private local Ray instance with `cfg.workers` CPUs is started and
shut down afterwards; with one (e.g. `auto` or `ray://host:10001`) the existing cluster is used.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from trajdata.errors import ConfigError, ExpertError, TrajdataError


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'trajdata[ray]'") from None
    return ray


def _shard_task(cfg, shard: int, progress) -> list[dict]:
    from trajdata.collectors.runner import run_shard

    pending = {"n": 0, "t": time.monotonic()}

    def report(n: int) -> None:
        pending["n"] += n
        if time.monotonic() - pending["t"] > 1.0:
            progress.add.remote(pending["n"])
            pending.update(n=0, t=time.monotonic())

    try:
        return run_shard(cfg, shard, report=report)
    finally:
        if pending["n"]:
            progress.add.remote(pending["n"])


class _Progress:
    """Step counts reported by running tasks, collected by the driver."""

    def __init__(self):
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def run_ray(cfg, todo: list[int], on_steps: Callable[[int], None], on_shard: Callable[[int, list], None]) -> None:
    """Run `runner.run_shard(cfg, s)` for every shard `s` in `todo` as Ray tasks."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, **kwargs)
        else:
            ray.init(num_cpus=cfg.workers, **kwargs)
        started = True
    try:
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        task = ray.remote(num_cpus=1, max_retries=2)(_shard_task)
        queue, running = list(todo), {}
    except BaseException:
        if started:
            ray.shutdown()
        raise
    try:
        while queue or running:
            while queue and len(running) < cfg.workers:
                s = queue.pop(0)
                running[task.remote(cfg, s, progress)] = s
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            n = ray.get(progress.take.remote())
            if n:
                on_steps(n)
            for ref in done:
                s = running.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, TrajdataError):
                        raise cause from None
                    raise ExpertError(f"Ray task for shard {s} failed: {cause or e}".splitlines()[0]) from None
                except ray.exceptions.RayError as e:
                    raise ExpertError(f"Ray task for shard {s} failed: {type(e).__name__}; finished shards are kept, rerun to resume") from None
                on_shard(s, rows)
        n = ray.get(progress.take.remote())
        if n:
            on_steps(n)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
