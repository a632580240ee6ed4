"""The `trajdata` command: a thin shell over library functions.

Each stage contributes a module under `trajdata.cli` with `register(cli)`; `COMMAND_MODULES` lists them.
"""
from __future__ import annotations

import importlib
import sys

import click

from trajdata import __version__
from trajdata.errors import TrajdataError

COMMAND_MODULES = [
    "trajdata.cli.dataset",
    "trajdata.cli.atari",
    "trajdata.cli.experts",
    "trajdata.cli.scaling",
    "trajdata.cli.loaders",
]


class _Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrajdataError as e:
            click.echo(f"trajdata: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("trajdata: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trajdata")
def cli():
    """trajdata: expert trajectories -> sharded datasets -> BC training -> scaling laws."""


@cli.group()
def collect():
    """Roll out an expert into a sharded dataset."""


@cli.group()
def train():
    """Train experts (PPO) or behavioural-cloning models."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)
