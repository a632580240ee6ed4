"""`trajdata train ppo` (Atari PPO experts) and `trajdata train bc` (behavioural cloning)."""
from __future__ import annotations

import os

import click

from trajdata.cli.options import dataclass_options
from trajdata.train.ppo import PPOConfig


@click.command("ppo")
@dataclass_options(PPOConfig)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory [default: runs/ppo-<game>-s<seed>].")
def train_ppo(out, **fields):
    """Train an SB3 PPO CnnPolicy expert on an Atari game (rl-zoo settings).

    Writes model.zip, config.json, eval.json (mean ± SE real score over --eval-episodes full
    games), progress.csv and checkpoints/. Rerunning the same command continues from the newest
    checkpoint.
    """
    from trajdata.train.ppo import train_ppo as run

    cfg = PPOConfig(**fields)
    out = out or f"runs/ppo-{cfg.game}-s{cfg.seed}"
    r = run(cfg, out)
    msg = f"{out}/model.zip: {r['timesteps']:,} timesteps"
    if "mean_return" in r:
        msg += f", return {r['mean_return']:.2f} ± {r['se_return']:.2f} over {r['episodes']} games"
    click.echo(msg)


# ---- train bc: every BCConfig field is a flag ------------------------------------------------------

def _bc_options(f):
    from trajdata.train.bc import BCConfig

    return dataclass_options(BCConfig)(f)


@click.command("bc")
@click.argument("dataset", type=click.Path())
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of BCConfig fields (top level or [bc]); flags given on the command line override it.")
@_bc_options
def train_bc(dataset, out, config_file, **flags):
    """Train a behavioural-cloning policy on DATASET, with a snapshot at every FLOP budget.

    Writes RUN/config.json, metrics.jsonl, checkpoint.pt (rolling, for resume), snapshots/budget-C.pt
    and runs.csv (run, params, samples, flops, validation loss ± SE: the columns `trajdata scaling
    fit` reads). Rerunning the same command resumes exactly (also after Ctrl-C or SIGTERM, which stop
    at the end of the current step); a different config or dataset in the same --out is refused, and
    so is a second train bc into it while one runs. Several GPUs: torchrun --nproc-per-node K -m
    trajdata.cli train bc ...
    """
    from trajdata.train.bc import BCConfig, train

    ctx = click.get_current_context()
    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    if config_file:
        cfg = BCConfig.from_toml(config_file, dataset=dataset, out=out, **given)
    else:
        cfg = BCConfig(dataset=dataset, out=out, **flags)
    r = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{r['run']}: {r['step']:,} steps, {r['samples']:,} samples, {r['flops']:.3g} FLOPs, "
                   f"N={r['params']:,}, {len(r['snapshots'])} snapshot(s)")


# ---- train rl: every RLConfig field is a flag ------------------------------------------------------

def _rl_options(f):
    from trajdata.rl.config import RLConfig

    return dataclass_options(RLConfig)(f)


@click.command("rl")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of RLConfig fields (top level or [rl]); flags given on the command line override it.")
@_rl_options
def train_rl(config_file, **flags):
    """Train the paper's NetHack agent (LSTM core) by IMPALA (TorchRL actors, V-trace, RMSprop), with a
    snapshot at every FLOP budget C = 8ND.

    Writes RUN/config.json, metrics.jsonl, checkpoint.pt (rolling, for resume), snapshots/budget-C.pt
    (policies `trajdata eval` plays) and runs.csv (run, params, samples = env steps D, flops: the
    columns `trajdata scaling fit` reads; eval adds the return). Rerunning the same command resumes
    from the last checkpoint; a different config in the same --out is refused.
    """
    from trajdata.rl.config import RLConfig
    from trajdata.rl.train import train

    ctx = click.get_current_context()
    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    cfg = RLConfig.from_toml(config_file, **given) if config_file else RLConfig(**flags)
    r = train(cfg)
    click.echo(f"{r['run']}: {r['step']:,} learner steps, {r['samples']:,} env steps, {r['flops']:.3g} FLOPs, "
               f"N={r['params']:,}, {r['episodes']:,} games, {len(r['snapshots'])} snapshot(s)")
