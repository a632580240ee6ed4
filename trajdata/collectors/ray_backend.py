"""Ray backend for the collection runner: the same per-shard function (`worker.run_shard`), as Ray tasks.

Output is identical to the local backend: each task writes one whole shard under `cfg.out`, so on a
multi-node cluster `--out` must be on a filesystem every node sees. At most `cfg.workers` shards run
at once. Without `--ray-address` a private local Ray instance with `cfg.workers` CPUs is started and
shut down afterwards; with one (e.g. `auto` or `ray://host:10001`) the existing cluster is used.

A task whose worker dies is retried by Ray (`max_retries=cfg.max_shard_retries`); a task that still
fails does not stop the others: its shard is reported as failed when all other shards are done.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from trajdata.collectors.worker import WORKER_DIED, run_shard
from trajdata.errors import ConfigError, ExpertError, TrajdataError


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'trajdata[ray]'") from None
    return ray


RAY_CONNECT_SECONDS = 30.0  # env TRAJDATA_RAY_CONNECT_SECONDS overrides
QUIET = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)  # no Ray INFO/WARNING lines


def start(ray, address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """``ray.init`` with ``QUIET`` (and ``kwargs``): a local instance of ``num_cpus`` CPUs, or the cluster at
    ``address`` (``connect``; its CPUs are its own)."""
    kwargs = {**QUIET, **kwargs}
    if address:
        connect(ray, address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def connect(ray, address: str, **kwargs) -> None:
    """``ray.init(address=...)``, bounded: Ray itself retries an unreachable cluster for minutes.

    A ``host:port`` that refuses TCP connections fails at once; anything else gets
    ``RAY_CONNECT_SECONDS`` (the attempt runs in a daemon thread left behind on timeout)."""
    timeout = float(os.environ.get("TRAJDATA_RAY_CONNECT_SECONDS", RAY_CONNECT_SECONDS))
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10.0)).close()
        except OSError as e:
            raise ConfigError(f"ray_address {address}: cannot connect ({e.strerror or e})",
                              field="ray_address") from None
    result: dict = {}

    def init() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            result["error"] = e

    t = threading.Thread(target=init, daemon=True, name="trajdata-ray-init")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ConfigError(f"ray_address {address}: no Ray cluster answered within {timeout:g}s", field="ray_address")
    if "error" in result:
        e = result["error"]
        raise ConfigError(f"ray_address {address}: cannot connect ({type(e).__name__}: {e})".splitlines()[0],
                          field="ray_address") from None


def _shard_task(cfg, shard: int, progress, work=run_shard) -> list[dict]:
    pending = {"n": 0, "t": time.monotonic()}

    def report(n: int) -> None:
        pending["n"] += n
        if time.monotonic() - pending["t"] > 1.0:
            progress.add.remote(shard, pending["n"])
            pending.update(n=0, t=time.monotonic())

    progress.restart.remote(shard)
    try:
        return work(cfg, shard, report=report)
    finally:
        if pending["n"]:
            progress.add.remote(shard, pending["n"])


class _Progress:
    """Step counts reported by running tasks, collected by the driver (a retried task's steps so far
    are taken back when it restarts)."""

    def __init__(self):
        self.n, self.per_shard = 0, {}

    def add(self, shard: int, n: int) -> None:
        self.n += n
        self.per_shard[shard] = self.per_shard.get(shard, 0) + n

    def restart(self, shard: int) -> None:
        self.n -= self.per_shard.pop(shard, 0)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def run_ray(cfg, todo: list[int], on_steps: Callable[[int], None],
            on_shard: Callable[[int, list], None], work: Callable = run_shard) -> dict[int, str]:
    """Run `work(cfg, s)` (default `worker.run_shard`) for every shard `s` in `todo` as Ray tasks;
    returns {shard: why it failed}."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        start(ray, cfg.ray_address, num_cpus=cfg.workers)
        started = True
    try:
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        task = ray.remote(num_cpus=1, max_retries=cfg.max_shard_retries)(_shard_task)
        queue, running, failed = list(todo), {}, {}
    except BaseException:
        if started:
            ray.shutdown()
        raise
    try:
        while queue or running:
            while queue and len(running) < cfg.workers:
                s = queue.pop(0)
                running[task.remote(cfg, s, progress, work)] = s
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
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                        ray.exceptions.NodeDiedError):
                    failed[s] = WORKER_DIED.format(n=cfg.max_shard_retries + 1)
                    progress.restart.remote(s)
                    continue
                except ray.exceptions.RayError as e:
                    failed[s] = f"Ray task failed ({type(e).__name__})"
                    progress.restart.remote(s)
                    continue
                on_shard(s, rows)
        n = ray.get(progress.take.remote())
        if n:
            on_steps(n)
        return failed
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
