"""`trajdata train ppo` and `trajdata collect ppo`: Atari PPO experts."""
from __future__ import annotations

import click

from trajdata.cli.common import collect_options, run_collect
from trajdata.collectors.atari import GAMES

_GAMES_HELP = ", ".join(GAMES)


class _Count(click.ParamType):
    name = "COUNT"

    def convert(self, value, param, ctx):
        from trajdata.train.ppo import parse_count

        return parse_count(value)


@click.command("ppo")
@click.option("--game", required=True, help=f"One of the paper's 8 games: {_GAMES_HELP}.")
@click.option("--timesteps", type=_Count(), default="10M", show_default=True, help="Agent steps over all envs (10M, 500k, 1e6).")
@click.option("--envs", "n_envs", type=int, default=8, show_default=True, help="Parallel environments.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory [default: runs/ppo-<game>-s<seed>].")
@click.option("--eval-episodes", type=int, default=10, show_default=True, help="Full games scored at the end (0: skip).")
@click.option("--checkpoint-every", type=_Count(), default="100k", show_default=True, help="Timesteps between checkpoints.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--subproc", is_flag=True, help="Step the envs in subprocesses (worth it with many free cores).")
def train_ppo_cmd(game, timesteps, n_envs, seed, out, eval_episodes, checkpoint_every, threads, subproc):
    """Train an SB3 PPO CnnPolicy expert on an Atari game (rl-zoo settings).

    Writes model.zip, config.json, eval.json (mean ± SE real score over --eval-episodes full
    games), progress.csv and checkpoints/. Rerunning the same command continues from the newest
    checkpoint.
    """
    from trajdata.train.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(game=game, timesteps=timesteps, n_envs=n_envs, seed=seed, eval_episodes=eval_episodes,
                    checkpoint_every=checkpoint_every, threads=threads, subproc=subproc)
    out = out or f"runs/ppo-{cfg.game}-s{seed}"
    r = train_ppo(cfg, out)
    msg = f"{out}/model.zip: {r['timesteps']:,} timesteps"
    if "mean_return" in r:
        msg += f", return {r['mean_return']:.2f} ± {r['se_return']:.2f} over {r['episodes']} games"
    click.echo(msg)


@click.command("ppo")
@click.option("--model", required=True, type=click.Path(), help="PPO model zip, or a `trajdata train ppo` run directory.")
@click.option("--game", default=None, help=f"Game ({_GAMES_HELP}) [default: from the model's config.json].")
@click.option("--deterministic", is_flag=True, help="Greedy actions instead of sampling from the policy.")
@collect_options(max_steps=27_000)  # ALE ends a game at 108k frames = 27k steps: keep whole games
def collect_ppo_cmd(model, game, deterministic, **opts):
    """Roll out a PPO Atari expert into shards: 84x84 gray frames, action, real reward, done, lives.

    Full games (all lives) with the preprocessing the model was trained on. Rerunning the same
    command resumes; every episode replays exactly from its recorded seed and actions.
    """
    from trajdata.collectors.atari import PPOExpert

    expert = PPOExpert(model, game, deterministic)
    run_collect("trajdata.collectors.atari:PPOExpert",
                {"model": str(expert.model.resolve()), "game": expert.game, "deterministic": deterministic}, **opts)


def register(cli: click.Group) -> None:
    cli.commands["train"].add_command(train_ppo_cmd)
    cli.commands["collect"].add_command(collect_ppo_cmd)
