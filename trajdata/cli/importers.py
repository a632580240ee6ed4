"""`trajdata import nld`: bring existing NLD data (NLD-AA, NLD-NAO, NLE ttyrecs) into trajdata shards."""
from __future__ import annotations

import json

import click

from trajdata.config import default
from trajdata.format.codec import PROFILE_HELP, PROFILES
from trajdata.importers.nld import NldImportConfig


def _d(name):
    return default(NldImportConfig, name)


@click.command("nld")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help="nle.dataset sqlite database (ttyrecs.db).")
@click.option("--name", required=True, help="Dataset name inside the database (e.g. nld-aa, nld-nao).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="trajdata dataset directory (created, or resumed).")
@click.option("--episodes-per-shard", default=_d("episodes_per_shard"), show_default=True, type=int, help="Games per shard.")
@click.option("--chunk-steps", default=_d("chunk_steps"), show_default=True, type=int, help="Steps per stored chunk.")
@click.option("--codec", default=_d("codec"), show_default=True, type=click.Choice(sorted(PROFILES)),
              help=PROFILE_HELP)
@click.option("--max-games", default=_d("max_games"), type=int, help="Import only the first N games (by gameid; N >= 1; default: all).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_nld(db, name, out, episodes_per_shard, chunk_steps, codec, max_games, quiet):
    """Import an NLD dataset indexed by nle.dataset into trajdata shards (schema "nld").

    Stores tty_chars/tty_colors/tty_cursor exactly as nle.dataset.TtyrecDataset yields them, the
    timestamp, keypress (ttyrec v2+) mapped to a NetHackChallenge action index (255: none), in-game
    score and the reward (score change) of each keypress (v3), and done on each game's last frame.
    Rerunning the same command skips finished shards.
    """
    from trajdata.importers.nld import import_nld as run

    cfg = NldImportConfig(db=db, name=name, out=out, episodes_per_shard=episodes_per_shard, chunk_steps=chunk_steps,
                          codec=codec, max_games=max_games)
    click.echo(json.dumps(run(cfg, progress=not quiet)))
