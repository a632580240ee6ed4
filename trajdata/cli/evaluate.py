"""`trajdata eval`: roll out BC snapshots or experts on a fixed list of seeded episodes."""
from __future__ import annotations

import click

from trajdata.cli.options import dataclass_options
from trajdata.evaluate.config import EvalConfig

HELP = {
    "episodes": "Episodes, seeded from --seed: every one is played to its end or --max-steps.",
    "seed": "First seed of the fixed episode list.",
    "max_steps": "Step cap per episode [NetHack 100000, Atari 27000].",
    "workers": "Worker processes.",
    "envs": "Envs each worker steps together (one batched forward per step).",
    "unit_episodes": "Consecutive episodes per unit of work [2 x --envs].",
    "greedy": "Take the argmax action instead of sampling from the softmax.",
    "temperature": "Sampling temperature (divides the logits).",
    "budget": "Evaluate the run's snapshot for this FLOP budget.",
    "all": "Evaluate every snapshot of the run.",
    "expert": "Play an expert on the same seeds instead: scripted, autoascend, random, or ppo:MODEL.",
    "character": "NetHack character ('@' = random) instead of the dataset's.",
    "env": "The env when no checkpoint names it: nethack or an Atari game.",
    "record": "Write the rollouts as a trajdata dataset here.",
    "record_chunk_steps": "Steps per chunk of the recorded dataset.",
    "out": "Directory of the eval JSONs [RUN/eval].",
    "context": "Transformer context in steps [the checkpoint's training --seq-len].",
    "backend": "local processes or ray.",
    "ray_address": "Ray cluster address (--backend ray).",
    "device": "Torch device of the policy.",
    "threads": "Torch threads per worker.",
    "update_runs": "Write return, return_se, episodes into RUN/runs.csv.",
}


@click.command("eval")
@click.argument("target", metavar="RUN_OR_CKPT", required=False, type=click.Path())
@dataclass_options(EvalConfig, HELP)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_cmd(target, no_progress, **flags):
    """Roll out BC snapshots (or an expert) on a fixed, seeded list of episodes: mean ± SE into runs.csv.

    Writes one JSON per policy (RUN/eval/<snapshot>.json: mean, SE, median, quartiles and every
    episode's seed, return, steps, end); rerunning plays only seeds not yet played.
    """
    from trajdata.evaluate import evaluate

    docs = evaluate(target, EvalConfig(**flags), progress=not no_progress)
    for d in docs:
        s = d["summary"]
        if s.get("episodes"):
            click.echo(f"{d.get('name', d.get('policy', '?'))}: return {s['mean']:.2f} ± {s['se']:.2f} "
                       f"(median {s['median']:.1f}) over {s['episodes']} episodes")
