"""`trajdata experts install autoascend`, `trajdata collect autoascend`, `trajdata stats`."""
from __future__ import annotations

import json

import click

from trajdata.cli.common import collect_options, run_collect


@click.group()
def experts():
    """Install and list third-party experts."""


@experts.command("install")
@click.argument("expert", type=click.Choice(["autoascend"]))
@click.option("--from", "source", default=None, metavar="URL_OR_PATH",
              help="Git URL, bare git dir or checkout to take the pinned commit from (default: GitHub).")
@click.option("--force", is_flag=True, help="Reinstall even if already installed.")
@click.option("--no-deps", is_flag=True, help="Do not pip-install AutoAscend's runtime packages.")
def install(expert, source, force, no_deps):
    """Fetch EXPERT's pinned source into the trajdata cache and install its PyPI needs."""
    from trajdata.collectors.install import AUTOASCEND_COMMIT, install_autoascend

    click.echo(f"installing AutoAscend {AUTOASCEND_COMMIT} ...", err=True)
    path = install_autoascend(source, force=force, deps=not no_deps)
    click.echo(str(path))


@experts.command("list")
def list_experts():
    """Show which third-party experts are installed, and where."""
    from trajdata.collectors.install import AUTOASCEND_COMMIT, autoascend_dir, installed_path

    path = installed_path()
    state = f"installed at {path}" if path else f"not installed (would go to {autoascend_dir()})"
    click.echo(f"autoascend {AUTOASCEND_COMMIT}: {state}")


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
    kwargs = {"character": character, "fix_moon_phase": not real_moon_phase,
              "no_progress_timeout": no_progress_timeout}
    if source is not None:
        kwargs["source"] = source
    run_collect("trajdata.collectors.autoascend:AutoAscendExpert", kwargs, quiet=quiet, **opts)


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--png", default=None, type=click.Path(dir_okay=False),
              help="Histogram image to write (default: DATASET/stats.png).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def stats(dataset, png, as_json):
    """Score, turn, depth and death-cause distributions of a NetHack dataset (compare with NLD-AA)."""
    from trajdata.evaluate.stats import dataset_stats, format_stats, plot_stats

    s = dataset_stats(dataset)
    s["png"] = str(plot_stats(dataset, png))
    click.echo(json.dumps(s, indent=2) if as_json else format_stats(s))


def register(cli) -> None:
    cli.add_command(experts)
    cli.add_command(stats)
    cli.commands["collect"].add_command(collect_autoascend)
