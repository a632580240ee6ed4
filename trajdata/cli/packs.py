"""`trajdata pack`, `trajdata unpack` and `trajdata export minari`."""
from __future__ import annotations

import json

import click

from trajdata.cli.options import dataclass_options
from trajdata.packs.build import PackConfig, UnpackConfig


@click.command("pack")
@click.argument("dataset", type=click.Path())
@dataclass_options(PackConfig)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pack_cmd(dataset, quiet, **opts):
    """Write DATASET as a pack: per episode what replays it exactly (seeds, settings, actions, step checks).

    About half a byte per step. `trajdata unpack` re-simulates it into a dataset that decodes to
    exactly what DATASET holds; the loaders stream a pack directly. Needs the env packages the
    dataset was played with (nle, or ale-py); imported NLD games carry no seeds and are refused.
    Rerunning resumes.
    """
    from trajdata.packs.build import pack

    r = pack(PackConfig(source=dataset, **opts), progress=not quiet)
    click.echo(json.dumps({k: v for k, v in r.items() if k != "config"}))


@click.command("unpack")
@click.argument("pack", type=click.Path())
@dataclass_options(UnpackConfig)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def unpack_cmd(pack, quiet, **opts):
    """Re-simulate PACK into a dataset: every step checked against the pack, shards as the source's.

    A replay that diverges (another nle / ale-py version, a corrupt action) stops with one line naming
    the episode and step; shards already written are kept, and rerunning resumes.
    """
    from trajdata.packs.build import unpack

    r = unpack(UnpackConfig(pack=pack, **opts), progress=not quiet)
    click.echo(json.dumps({k: v for k, v in r.items() if k != "config"}))


@click.command("minari")
@click.argument("dataset", type=click.Path())
@click.option("--name", required=True,
              help="Minari dataset id, e.g. trajdata/nethack-aa-v0 ((namespace/)name-v(version)).")
@click.option("--final-obs", type=click.Choice(["replay", "repeat"]), default="replay", show_default=True,
              help="Minari episodes end with the observation after the last action, which trajdata does not store: "
                   "re-simulate it (replay) or repeat the last stored one (repeat; for data that cannot be replayed).")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Minari's datasets directory [default: $MINARI_DATASETS_PATH, else ~/.minari/datasets].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_minari_cmd(dataset, name, final_obs, root, quiet):
    """Write DATASET as a Minari dataset (minari.load_dataset(NAME) opens it), step for step equal.

    Observation space: a Dict of one Box per observation field; action space: Discrete. Stored
    losslessly (arrow, no JPEG).
    """
    from trajdata.exporters.minari import export_minari

    click.echo(json.dumps(export_minari(dataset, name, final_obs=final_obs, minari_root=root, progress=not quiet)))
