"""Options every `trajdata collect EXPERT` command shares, and the call into the runner."""
from __future__ import annotations

import json

import click

from trajdata.collectors.runner import BACKENDS, CollectConfig, ExpertSpec, collect
from trajdata.format.codec import DEFAULT_PROFILE, PROFILES


def collect_options(f=None, *, max_steps: int = 10_000, max_seconds: float | None = None):
    """Decorate a collect command with --out/--shards/--episodes-per-shard/--workers/--seed/caps/--backend.

    Use bare (``@collect_options``) or with per-expert cap defaults (``@collect_options(max_steps=...)``).
    """
    if f is None:
        return lambda g: collect_options(g, max_steps=max_steps, max_seconds=max_seconds)
    options = [
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset directory (created, or resumed)."),
        click.option("--shards", default=4, show_default=True, type=int, help="Number of shards (units of work)."),
        click.option("--episodes-per-shard", default=1, show_default=True, type=int),
        click.option("--workers", default=1, show_default=True, type=int, help="Parallel worker processes."),
        click.option("--seed", default=0, show_default=True, type=int, help="Base seed; episode seeds derive from it."),
        click.option("--max-steps", default=max_steps, show_default=True, type=int, help="Per-episode step cap (episode kept, marked truncated)."),
        click.option("--max-seconds", default=max_seconds, show_default=True, type=float, help="Per-episode wall-time cap."),
        click.option("--stall-seconds", default=60.0, show_default=True, type=float, help="Watchdog: truncate an episode after this long without a step."),
        click.option("--hard-stall-seconds", default=None, type=float,
                     help="Backstop for hangs inside C code: dump the stack and kill the worker after this long "
                          "without a step (its shard is retried). Default: max(2 x stall, stall + 30); 0 = off."),
        click.option("--max-shard-retries", default=2, show_default=True, type=int,
                     help="Rerun a shard whose worker died (crash, out of memory, hang) this many times, then give it up."),
        click.option("--chunk-steps", default=4096, show_default=True, type=int, help="Steps per stored chunk."),
        click.option("--codec", default=DEFAULT_PROFILE, show_default=True, type=click.Choice(sorted(PROFILES)),
                     help="Storage profile: stream (smallest; the loader decodes it straight into batches), "
                          "compact or fast (older profiles; kept for comparison)."),
        click.option("--backend", default="local", show_default=True, type=click.Choice(BACKENDS)),
        click.option("--ray-address", default=None, help="Ray cluster address (with --backend ray; default: start local Ray)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def run_collect(target: str, expert_kwargs: dict, quiet: bool = False, **opts) -> dict:
    cfg = CollectConfig(expert=ExpertSpec(target, expert_kwargs), **opts)
    result = collect(cfg, progress=not quiet)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result
