"""The `trajdata` command: a thin shell over library functions.

Commands live in the CLI module of their stage (``trajdata.cli.<stage>``) and are loaded only when
invoked: ``COMMANDS`` names each one's module, one-line help (for the listings) and the extras it
needs, so `trajdata --help` imports nothing heavy and works with only the core dependencies. Errors
are one line: a ``TrajdataError`` (config fields shown as the command's flags), a missing optional
dependency (naming the extra to install), or a usage error.
"""
from __future__ import annotations

import importlib
import re
import sys

import click

from trajdata import __version__
from trajdata.errors import DISK_FULL, ConfigError, Terminated, TrajdataError, missing_extra, write_error

# name -> (module:command, one-line help, extras it needs) for a command, or (help, {name: ...}) for a group.
COMMANDS: dict = {
    "collect": ("Roll out an expert into a sharded dataset.", {
        "scripted": ("trajdata.cli.collect:collect_scripted",
                     "Collect NetHack games played by the built-in scripted expert (needs only nle).", ("nethack",)),
        "autoascend": ("trajdata.cli.collect:collect_autoascend",
                       "Collect NetHack games played by AutoAscend (every keypress is a step).",
                       ("nethack", "autoascend")),
        "ppo": ("trajdata.cli.collect:collect_ppo",
                "Roll out a PPO Atari expert into shards: 84x84 gray frames, action, real reward, done, lives.",
                ("atari", "train")),
    }),
    "experts": ("Install and list third-party experts.", {
        "install": ("trajdata.cli.collect:experts_install",
                    "Fetch EXPERT's pinned source into the trajdata cache and install its PyPI needs.", ()),
        "list": ("trajdata.cli.collect:experts_list", "Show which third-party experts are installed, and where.", ()),
    }),
    "import": ("Convert datasets in other formats into trajdata shards.", {
        "nld": ("trajdata.cli.importers:import_nld",
                "Import an NLD dataset indexed by nle.dataset into trajdata shards (schema \"nld\").", ("nethack",)),
    }),
    "pack": ("trajdata.cli.packs:pack_cmd",
             "Write DATASET as a pack: per episode what replays it exactly (seeds, settings, actions, step checks).",
             ("nethack", "atari")),
    "unpack": ("trajdata.cli.packs:unpack_cmd",
               "Re-simulate PACK into a dataset: every step checked against the pack, shards as the source's.",
               ("nethack", "atari")),
    "export": ("Convert trajdata datasets into other formats.", {
        "minari": ("trajdata.cli.packs:export_minari_cmd",
                   "Write DATASET as a Minari dataset (minari.load_dataset(NAME) opens it), step for step equal.",
                   ("minari", "nethack", "atari")),
    }),
    "inspect": ("trajdata.cli.dataset:inspect", "Episodes, steps, bytes/step overall and per field, score/length summary.",
                ()),
    "verify": ("trajdata.cli.dataset:verify", "Decode every chunk, check every checksum, and cross-check the index.", ()),
    "show": ("trajdata.cli.dataset:show",
             "Render one step's screen (NetHack tty in colour, or the Atari frame) in the terminal.", ()),
    "index": ("trajdata.cli.dataset:index", "Rebuild index.parquet from the shards alone.", ()),
    "recode": ("trajdata.cli.dataset:recode",
               "Copy DATASET to --out with every chunk re-encoded in another storage profile.", ()),
    "stats": ("trajdata.cli.dataset:stats",
              "Score, turn, depth and death-cause distributions of a NetHack dataset (compare with NLD-AA).",
              ("scaling",)),
    "train": ("Train experts (PPO), behavioural-cloning or RL models.", {
        "ppo": ("trajdata.cli.train:train_ppo",
                "Train an SB3 PPO CnnPolicy expert on an Atari game (rl-zoo settings).", ("atari", "train")),
        "bc": ("trajdata.cli.train:train_bc",
               "Train a behavioural-cloning policy on DATASET, with a snapshot at every FLOP budget.", ("train",)),
        "rl": ("trajdata.cli.train:train_rl",
               "Train the paper's NetHack agent (LSTM core) by IMPALA (TorchRL actors, V-trace, RMSprop), with a "
               "snapshot at every FLOP budget C = 8ND.",
               ("rl", "train", "nethack")),
    }),
    "eval": ("trajdata.cli.evaluate:eval_cmd",
             "Roll out BC snapshots (or an expert) on a fixed, seeded list of episodes: mean ± SE into runs.csv.",
             ("train",)),
    "sweep": ("trajdata.cli.sweep:sweep_cmd",
              "Plan and run a scaling sweep: collect, train bc per size, eval every snapshot, fit, report.",
              ("train", "scaling")),
    "scaling": ("Fit imitation-learning scaling laws to a runs table and forecast compute-optimal runs.", {
        "fit": ("trajdata.cli.scaling:fit_cmd",
                "Fit isoFLOP profiles, parametric laws and return-vs-loss to RUNS (CSV or Parquet).", ("scaling",)),
        "forecast": ("trajdata.cli.scaling:forecast_cmd",
                     "Compute-optimal N, D, C and predicted loss/return from a fit JSON (or a RUNS file, fitted first).",
                     ("scaling",)),
    }),
}

_LEAF = "trajdata.leaf"  # ctx.meta key: (command path, extras, command) of the command being run


class LazyGroup(click.Group):
    """A group whose commands are imported from ``entries`` when run, and listed without importing."""

    def __init__(self, *args, entries: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.entries = entries

    def list_commands(self, ctx) -> list[str]:
        return list(self.entries)

    def get_command(self, ctx, name: str):
        entry = self.entries.get(name)
        if entry is None:
            return None
        if isinstance(entry[1], dict):
            return LazyGroup(name=name, help=entry[0], entries=entry[1])
        target, _, extras = entry
        path = f"{ctx.command_path} {name}"
        module, _, attr = target.partition(":")
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            raise missing_extra(e, f"`{path}`", extras) from None
        ctx.meta[_LEAF] = (path, extras, cmd)
        return cmd

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, e[0] if isinstance(e[1], dict) else e[1]) for name, e in self.entries.items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def flag_message(err: ConfigError, cmd: click.Command | None) -> str:
    """The error's message with its config field shown as ``cmd``'s flag for it (``max_steps`` -> ``--max-steps``)."""
    msg = str(err)
    if err.field is None or cmd is None:
        return msg
    opt = next((p for p in cmd.params if isinstance(p, click.Option) and p.name == err.field), None)
    if opt is None:
        return msg
    flag = max(opt.opts, key=len)
    return re.sub(rf"(?<![\w/.-]){re.escape(err.field)}(?![\w-])", flag, msg, count=1)


class _Cli(LazyGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrajdataError as e:
            leaf = ctx.meta.get(_LEAF)
            msg = flag_message(e, leaf[2] if leaf else None) if isinstance(e, ConfigError) else str(e)
            click.echo(f"trajdata: error: {msg}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as e:
            path, extras, _ = ctx.meta.get(_LEAF, ("trajdata", (), None))
            click.echo(f"trajdata: error: {missing_extra(e, f'`{path}`', extras)}", err=True)
            sys.exit(1)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            click.echo(f"trajdata: error: {write_error(e, e.filename or 'a file')}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            _interrupted(e)

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        restore = _terminate_like_interrupt()
        try:
            self._main(args, prog_name, **kwargs)
        finally:
            restore()

    def _main(self, args, prog_name, **kwargs):
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "trajdata")
            click.echo(f"trajdata: error: {e.format_message()} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"trajdata: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt) as e:
            _interrupted(e)
        sys.exit(rv if isinstance(rv, int) else 0)


def _interrupted(e: BaseException):
    """Ctrl-C or SIGTERM: one line and 130 / 143 (the cleanup ran in the ``finally`` blocks on the way out)."""
    detail = f" ({e})" if isinstance(e, KeyboardInterrupt) and str(e) else ""
    if isinstance(e, Terminated):
        click.echo(f"trajdata: terminated{detail}", err=True)
        sys.exit(143)
    click.echo(f"trajdata: interrupted{detail}", err=True)
    sys.exit(130)


def _terminate_like_interrupt():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread, so it cleans up like
    Ctrl-C; returns a function restoring the previous handler."""
    import signal
    import threading

    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or old not in (signal.SIG_DFL, None):
        return lambda: None

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup is not interrupted again
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, old)


@click.group(cls=_Cli, entries=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trajdata")
def cli():
    """trajdata: expert trajectories -> sharded datasets -> BC training -> scaling laws."""
