"""`trajdata train ppo`: Atari PPO experts."""
from __future__ import annotations

import click

from trajdata.config import default
from trajdata.envs.atari import GAMES
from trajdata.train.ppo import PPOConfig, parse_count


def _d(name):
    return default(PPOConfig, name)


class _Count(click.ParamType):
    name = "COUNT"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_count(value)


@click.command("ppo")
@click.option("--game", required=True, help=f"One of the paper's 8 games: {', '.join(GAMES)}.")
@click.option("--timesteps", type=_Count(), default=_d("timesteps"), show_default=True,
              help="Agent steps over all envs (10M, 500k, 1e6).")
@click.option("--envs", "n_envs", type=int, default=_d("n_envs"), show_default=True, help="Parallel environments.")
@click.option("--seed", type=int, default=_d("seed"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory [default: runs/ppo-<game>-s<seed>].")
@click.option("--eval-episodes", type=int, default=_d("eval_episodes"), show_default=True,
              help="Full games scored at the end (0: skip).")
@click.option("--checkpoint-every", type=_Count(), default=_d("checkpoint_every"), show_default=True,
              help="Timesteps between checkpoints.")
@click.option("--threads", type=int, default=_d("threads"), show_default=True, help="torch CPU threads.")
@click.option("--subproc", is_flag=True, help="Step the envs in subprocesses (worth it with many free cores).")
def train_ppo(game, timesteps, n_envs, seed, out, eval_episodes, checkpoint_every, threads, subproc):
    """Train an SB3 PPO CnnPolicy expert on an Atari game (rl-zoo settings).

    Writes model.zip, config.json, eval.json (mean ± SE real score over --eval-episodes full
    games), progress.csv and checkpoints/. Rerunning the same command continues from the newest
    checkpoint.
    """
    from trajdata.train.ppo import train_ppo as run

    cfg = PPOConfig(game=game, timesteps=timesteps, n_envs=n_envs, seed=seed, eval_episodes=eval_episodes,
                    checkpoint_every=checkpoint_every, threads=threads, subproc=subproc)
    out = out or f"runs/ppo-{cfg.game}-s{seed}"
    r = run(cfg, out)
    msg = f"{out}/model.zip: {r['timesteps']:,} timesteps"
    if "mean_return" in r:
        msg += f", return {r['mean_return']:.2f} ± {r['se_return']:.2f} over {r['episodes']} games"
    click.echo(msg)


# ---- train bc: every BCConfig field is a flag ------------------------------------------------------

BC_HELP = {
    "run_id": "Name of this run in runs.csv [default: the --out directory's name].",
    "family": "Model family; auto picks the Atari CNN for Atari datasets, else the NetHack agent.",
    "preset": "A size of the paper's NetHack grid: grid-1 (64,1) .. grid-10 (1088,10); paper = (384,4).",
    "params": "Target effective parameters (10M, 250k): picks (width, layers) at width ~ 100 x layers (Atari: the CNN width).",
    "width": "Core width h (NetHack) or CNN width multiplier w (Atari).",
    "layers": "Transformer / LSTM layers (NetHack).",
    "heads": "Attention heads (0: width // 64).",
    "core": "Sequence core: transformer, lstm, or mamba (needs mamba-ssm, CUDA).",
    "use_glyphs": "Also embed the dungeon glyphs (information parity with the paper's text).",
    "use_inventory": "Use the inventory encoder (--no-use-inventory: the paper's ablation).",
    "use_message": "Use the message encoder (--no-use-message: the paper's ablation).",
    "seq_len": "Unroll length T (lanes of whole episodes, back to back).",
    "batch_size": "Lanes per micro-batch per rank (B).",
    "grad_accum": "Micro-batches per optimizer step.",
    "samples_per_step": "Samples per optimizer step over all ranks (sets --grad-accum; paper: 262144).",
    "val_fraction": "Fraction of episodes (by hash of id) held out for the validation loss.",
    "val_batches": "Validation batches per snapshot (0: the whole split).",
    "num_workers": "Loader worker processes per rank.",
    "lr": "Peak learning rate (AdamW).",
    "schedule": "constant (isoFLOP runs: one run serves every budget) or cosine (warm-up, then decay).",
    "warmup_steps": "Linear warm-up optimizer steps.",
    "min_lr_ratio": "Cosine: final LR as a fraction of --lr.",
    "decay_steps": "Cosine length in optimizer steps [default: the run's end].",
    "weight_decay": "AdamW weight decay (the paper: 0).",
    "beta1": "AdamW beta1.",
    "beta2": "AdamW beta2.",
    "eps": "AdamW epsilon.",
    "grad_clip": "Max global gradient norm, on unscaled gradients (0: off).",
    "ema": "Snapshots (and their val loss) use an exponential moving average of the weights with this decay per optimizer step, warmed up as min(ema, (1+t)/(10+t)); 0: the raw weights. Steadies snapshots under a constant LR.",
    "budgets": "FLOP budgets, comma-separated (1e13,2e13,5e13): a snapshot, validation loss and runs.csv row at each.",
    "samples": "Stop after this many samples (steps) [default: the largest budget, else one pass over the data].",
    "device": "auto (CUDA when present), cpu or cuda.",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.",
    "compile": "torch.compile the model.",
    "seed": "Seed of the model init and of the episode order.",
    "log_every": "Optimizer steps between metrics.jsonl rows.",
    "checkpoint_every": "Optimizer steps between rolling checkpoints (RUN/checkpoint.pt).",
    "progress": "Show a progress bar.",
    "trace_episodes": "Log the steps each rank trained on, per episode and epoch (RUN/episodes.rank<r>.jsonl).",
    "tensorboard": "Write TensorBoard events to RUN/tb when tensorboard is installed.",
}


class _Budgets(click.ParamType):
    name = "C,C,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of FLOP counts (like 1e13,2e13)", param, ctx)


def _bc_options(f):
    from trajdata.cli.options import dataclass_options
    from trajdata.train.bc import PRESETS, BCConfig

    special = {"budgets": dict(type=_Budgets(), default=""),
               "samples": dict(type=_Count(), default=None), "samples_per_step": dict(type=_Count(), default=None),
               "preset": dict(type=click.Choice(list(PRESETS)), default=None)}
    return dataclass_options(BCConfig, BC_HELP, skip=("dataset", "out"), special=special)(f)


@click.command("bc")
@click.argument("dataset", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (rerun to resume).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of BCConfig fields (top level or [bc]); flags given on the command line override it.")
@_bc_options
def train_bc(dataset, out, config_file, **flags):
    """Train a behavioural-cloning policy on DATASET, with a snapshot at every FLOP budget.

    Writes RUN/config.json, metrics.jsonl, checkpoint.pt (rolling, for resume), snapshots/budget-C.pt
    and runs.csv (run, params, samples, flops, validation loss ± SE: the columns `trajdata scaling
    fit` reads). Rerunning the same command resumes exactly; a different config in the same --out
    is refused. Several GPUs: torchrun --nproc-per-node K -m trajdata.cli train bc ...
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
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        click.echo(f"{r['run']}: {r['step']:,} steps, {r['samples']:,} samples, {r['flops']:.3g} FLOPs, "
                   f"N={r['params']:,}, {len(r['snapshots'])} snapshot(s)")


# ---- train rl: every RLConfig field is a flag ------------------------------------------------------

RL_HELP = {
    "run_id": "Name of this run in runs.csv [default: the --out directory's name].",
    "env": "NLE task: NetHackScore-v0 (the paper's RL env: human monk, 23 actions) or NetHackChallenge-v0.",
    "character": "NetHack character ('@' = random per game) [the env's default].",
    "params": "Target effective parameters (100k, 1M): picks the LSTM width at --layers.",
    "width": "LSTM core width h (and the mixer's) [64].",
    "layers": "LSTM layers.",
    "use_inventory": "Use the inventory encoder.",
    "use_message": "Use the message encoder.",
    "use_glyphs": "Also embed the dungeon glyphs.",
    "init": "Start from this BC run's largest-budget snapshot (or a .pt file) of the LSTM-core family "
            "(train bc --core lstm): its architecture and weights.",
    "kickstart_coef": "Weight of the cross-entropy toward the --init BC policy at learner step 0 (0: off).",
    "kickstart_decay": "Factor on the kickstart weight per learner step.",
    "actors": "Actor processes (0: act in the learner's process, synchronously). With --ray-address: Ray actors.",
    "envs": "Games each actor steps together (one batched forward); rows of a learner batch.",
    "unroll": "Steps per row of a learner batch (T).",
    "ray_address": "Run the actors on this Ray cluster (auto, host:port, or local for a Ray started here).",
    "lr": "RMSprop learning rate.",
    "rms_alpha": "RMSprop smoothing constant.",
    "rms_eps": "RMSprop epsilon.",
    "rms_momentum": "RMSprop momentum.",
    "grad_clip": "Max global gradient norm (0: off).",
    "gamma": "Discount.",
    "baseline_coef": "Weight of the value (baseline) loss.",
    "entropy_coef": "Weight of the entropy bonus.",
    "reward_scale": "Rewards are multiplied by this for learning (returns are logged unscaled).",
    "reward_clip": "Scaled rewards are clipped to +-this.",
    "rho_clip": "V-trace clip of the importance weights (rho-bar).",
    "c_clip": "V-trace clip of the trace coefficients (c-bar).",
    "budgets": "FLOP budgets C = 8ND, comma-separated: a snapshot and a runs.csv row at each.",
    "steps": "Stop after this many env steps D trained on [default: the largest budget's].",
    "seed": "Seed of the model init, the action sampling and the games.",
    "device": "The learner's device: auto (CUDA when present), cpu or cuda.",
    "threads": "Torch threads of the learner (each actor uses one).",
    "log_every": "Learner steps between metrics.jsonl rows.",
    "checkpoint_every": "Learner steps between rolling checkpoints (RUN/checkpoint.pt).",
    "progress": "Show a progress bar.",
    "tensorboard": "Write TensorBoard events to RUN/tb when tensorboard is installed.",
}


def _rl_options(f):
    from trajdata.cli.options import dataclass_options
    from trajdata.rl.config import ENVS, RLConfig

    special = {"budgets": dict(type=_Budgets(), default=""), "steps": dict(type=_Count(), default=None),
               "env": dict(type=click.Choice(list(ENVS)), default="NetHackScore-v0", show_default=True),
               "init": dict(type=click.Path(), default=None)}
    return dataclass_options(RLConfig, RL_HELP, skip=("out",), special=special)(f)


@click.command("rl")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (rerun to resume).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of RLConfig fields (top level or [rl]); flags given on the command line override it.")
@_rl_options
def train_rl(out, config_file, **flags):
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
    cfg = RLConfig.from_toml(config_file, out=out, **given) if config_file else RLConfig(out=out, **flags)
    r = train(cfg)
    click.echo(f"{r['run']}: {r['step']:,} learner steps, {r['samples']:,} env steps, {r['flops']:.3g} FLOPs, "
               f"N={r['params']:,}, {r['episodes']:,} games, {len(r['snapshots'])} snapshot(s)")
