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
