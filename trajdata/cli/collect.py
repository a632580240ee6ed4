"""`trajdata collect scripted|autoascend|ppo` and `trajdata experts install|list`."""
from __future__ import annotations

import json

import click

from trajdata.cli.options import dataclass_options
from trajdata.collectors.config import EXPERTS, CollectConfig, ExpertSpec
from trajdata.envs.atari import GAMES

_GAMES_HELP = ", ".join(GAMES)


def collect_options(f=None, **defaults):
    """Decorate a collect command with CollectConfig's fields as flags, and ``--quiet``; ``defaults``
    are this expert's own defaults (``@collect_options(max_steps=200_000)``)."""
    if f is None:
        return lambda g: collect_options(g, **defaults)
    f = click.option("--quiet", is_flag=True, help="No progress bar.")(f)
    return dataclass_options(CollectConfig, skip=("expert",), defaults=defaults)(f)


def run_collect(expert: str, expert_kwargs: dict, quiet: bool = False, **opts) -> dict:
    """Collect with ``expert`` (a name of ``EXPERTS``, or a ``"module:Class"`` target) and print the summary."""
    from trajdata.collectors.runner import collect

    spec = ExpertSpec.named(expert, **expert_kwargs) if expert in EXPERTS else ExpertSpec(expert, expert_kwargs)
    cfg = CollectConfig(expert=spec, **opts)
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
    run_collect("scripted", {"character": character, "fix_moon_phase": not real_moon_phase}, quiet=quiet, **opts)


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
    run_collect("autoascend", kwargs, quiet=quiet, **opts)


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
    run_collect("ppo", {"model": str(expert.model.resolve()), "game": expert.game, "deterministic": deterministic}, **opts)


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
