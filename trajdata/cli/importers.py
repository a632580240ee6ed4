"""`trajdata import nld`: bring existing NLD data (NLD-AA, NLD-NAO, NLE ttyrecs) into trajdata shards."""
from __future__ import annotations

import json

import click

from trajdata.cli.options import dataclass_options
from trajdata.importers.nld import NldImportConfig


@click.command("nld")
@dataclass_options(NldImportConfig)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_nld(quiet, **fields):
    """Import an NLD dataset indexed by nle.dataset into trajdata shards (schema "nld").

    Stores tty_chars/tty_colors/tty_cursor exactly as nle.dataset.TtyrecDataset yields them, the
    timestamp, keypress (ttyrec v2+) mapped to a NetHackChallenge action index (255: none), in-game
    score and the reward (score change) of each keypress (v3), and done on each game's last frame.
    Rerunning the same command skips finished shards.
    """
    from trajdata.importers.nld import import_nld as run

    click.echo(json.dumps(run(NldImportConfig(**fields), progress=not quiet)))
