"""`trajdata collect scripted|autoascend|ppo` and `trajdata experts install|list`."""
from __future__ import annotations

import json

import click

from trajdata.collectors.config import BACKENDS, CollectConfig, ExpertSpec
from trajdata.config import default
from trajdata.envs.atari import GAMES
from trajdata.format.codec import PROFILE_HELP, PROFILES

_GAMES_HELP = ", ".join(GAMES)


def _d(name):
    return default(CollectConfig, name)


def collect_options(f=None, *, max_steps: int | None = None, max_seconds: float | None = None):
    """Decorate a collect command with CollectConfig's fields as flags (defaults from the dataclass).

    Use bare (``@collect_options``) or with per-expert cap defaults (``@collect_options(max_steps=...)``).
    """
    if f is None:
        return lambda g: collect_options(g, max_steps=max_steps, max_seconds=max_seconds)
    max_steps = _d("max_steps") if max_steps is None else max_steps
    max_seconds = _d("max_seconds") if max_seconds is None else max_seconds
    options = [
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset directory (created, or resumed)."),
        click.option("--shards", default=_d("shards"), show_default=True, type=int, help="Number of shards (units of work)."),
        click.option("--episodes-per-shard", default=_d("episodes_per_shard"), show_default=True, type=int,
                     help="Episodes played into each shard (a dataset holds shards x this many)."),
        click.option("--workers", default=_d("workers"), show_default=True, type=int, help="Parallel worker processes."),
        click.option("--seed", default=_d("seed"), show_default=True, type=int, help="Base seed; episode seeds derive from it."),
        click.option("--max-steps", default=max_steps, show_default=True, type=int,
                     help="Per-episode step cap (episode kept, marked truncated)."),
        click.option("--max-seconds", default=max_seconds, show_default=True, type=float, help="Per-episode wall-time cap."),
        click.option("--stall-seconds", default=_d("stall_seconds"), show_default=True, type=float,
                     help="Watchdog: truncate an episode after this long without a step; 0 disables the watchdog."),
        click.option("--hard-stall-seconds", default=_d("hard_stall_seconds"), type=float,
                     help="Backstop for hangs inside C code: dump the stack and kill the worker after this long "
                          "without a step (its shard is retried). Default: max(2 x stall, stall + 30); 0 = off."),
        click.option("--max-shard-retries", default=_d("max_shard_retries"), show_default=True, type=int,
                     help="Rerun a shard whose worker died (crash, out of memory, hang) this many times, then give it up."),
        click.option("--chunk-steps", default=_d("chunk_steps"), show_default=True, type=int, help="Steps per stored chunk."),
        click.option("--codec", default=_d("codec"), show_default=True, type=click.Choice(sorted(PROFILES)),
                     help=PROFILE_HELP),
        click.option("--backend", default=_d("backend"), show_default=True, type=click.Choice(BACKENDS)),
        click.option("--ray-address", default=_d("ray_address"),
                     help="Ray cluster address (with --backend ray; default: start local Ray)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def run_collect(target: str, expert_kwargs: dict, quiet: bool = False, **opts) -> dict:
    from trajdata.collectors.runner import collect

    cfg = CollectConfig(expert=ExpertSpec(target, expert_kwargs), **opts)
    result = collect(cfg, progress=not quiet)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


@click.command("scripted")
@collect_options
@click.option("--character", default="@", show_default=True, help="'@' for random, or e.g. mon-hum-neu-mal.")
@click.option("--real-moon-phase", is_flag=True, help="Use the real date's moon phase (default: fixed, reproducible).")
def collect_scripted(character, real_moon_phase, quiet, **opts):
    """Collect NetHack games played by the built-in scripted expert (needs only nle)."""
    from trajdata.envs.nethack import check_character

    check_character(character)
    run_collect("trajdata.collectors.nethack:ScriptedExpert",
                {"character": character, "fix_moon_phase": not real_moon_phase}, quiet=quiet, **opts)


@click.command("autoascend")
@collect_options(max_steps=200_000, max_seconds=3600.0)
@click.option("--character", default="@", show_default=True,
              help="'@' for random per episode (like NLD-AA), or e.g. mon-hum-neu-mal.")
@click.option("--real-moon-phase", is_flag=True, help="Use the real date's moon phase (default: fixed, reproducible).")
@click.option("--no-progress-timeout", default=1000, show_default=True, type=int,
              help="NLE ends a game after this many steps without a game turn passing.")
@click.option("--source", default=None, type=click.Path(file_okay=False),
              help="AutoAscend source directory to use instead of the installed one.")
def collect_autoascend(character, real_moon_phase, no_progress_timeout, source, quiet, **opts):
    """Collect NetHack games played by AutoAscend (every keypress is a step).

    Needs `trajdata experts install autoascend` first.
    """
    from trajdata.envs.nethack import check_character

    check_character(character)
    kwargs = {"character": character, "fix_moon_phase": not real_moon_phase,
              "no_progress_timeout": no_progress_timeout}
    if source is not None:
        kwargs["source"] = source
    run_collect("trajdata.collectors.autoascend:AutoAscendExpert", kwargs, quiet=quiet, **opts)


@click.command("ppo")
@click.option("--model", required=True, type=click.Path(), help="PPO model zip, or a `trajdata train ppo` run directory.")
@click.option("--game", default=None, help=f"Game ({_GAMES_HELP}) [default: from the model's config.json].")
@click.option("--deterministic", is_flag=True, help="Greedy actions instead of sampling from the policy.")
@collect_options(max_steps=27_000)  # ALE ends a game at 108k frames = 27k steps: keep whole games
def collect_ppo(model, game, deterministic, **opts):
    """Roll out a PPO Atari expert into shards: 84x84 gray frames, action, real reward, done, lives.

    Full games (all lives) with the preprocessing the model was trained on. Rerunning the same
    command resumes; every episode replays exactly from its recorded seed and actions.
    """
    from trajdata.collectors.atari import PPOExpert

    expert = PPOExpert(model, game, deterministic)
    run_collect("trajdata.collectors.atari:PPOExpert",
                {"model": str(expert.model.resolve()), "game": expert.game, "deterministic": deterministic}, **opts)


@click.command("install")
@click.argument("expert", type=click.Choice(["autoascend"]))
@click.option("--from", "source", default=None, metavar="URL_OR_PATH",
              help="Git URL, bare git dir or checkout to take the pinned commit from (default: GitHub).")
@click.option("--force", is_flag=True, help="Reinstall even if already installed.")
@click.option("--no-deps", is_flag=True, help="Do not pip-install AutoAscend's runtime packages.")
def experts_install(expert, source, force, no_deps):
    """Fetch EXPERT's pinned source into the trajdata cache and install its PyPI needs."""
    from trajdata.collectors.install import AUTOASCEND_COMMIT, install_autoascend

    click.echo(f"installing AutoAscend {AUTOASCEND_COMMIT} ...", err=True)
    path = install_autoascend(source, force=force, deps=not no_deps)
    click.echo(str(path))


@click.command("list")
def experts_list():
    """Show which third-party experts are installed, and where."""
    from trajdata.collectors.install import AUTOASCEND_COMMIT, autoascend_dir, installed_path

    path = installed_path()
    state = f"installed at {path}" if path else f"not installed (would go to {autoascend_dir()})"
    click.echo(f"autoascend {AUTOASCEND_COMMIT}: {state}")
