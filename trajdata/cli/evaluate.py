"""`trajdata eval`: roll out BC snapshots or experts on a fixed list of seeded episodes."""
from __future__ import annotations

import click

from trajdata.cli.options import dataclass_options
from trajdata.evaluate.config import EvalConfig

@click.command("eval")
@click.argument("target", metavar="RUN_OR_CKPT", required=False, type=click.Path())
@dataclass_options(EvalConfig)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_cmd(target, no_progress, **flags):
    """Roll out BC snapshots (or an expert) on a fixed, seeded list of episodes: mean ± SE into runs.csv.

    Writes one JSON per policy (RUN/eval/<snapshot>.json: mean, SE, median, quartiles and every
    episode's seed, return, steps, end); rerunning plays only seeds not yet played. One eval per
    output directory at a time; its workers die with it.
    """
    from trajdata.evaluate import evaluate

    docs = evaluate(target, EvalConfig(**flags), progress=not no_progress)
    for d in docs:
        s = d["summary"]
        if s.get("episodes"):
            click.echo(f"{d.get('name', d.get('policy', '?'))}: return {s['mean']:.2f} ± {s['se']:.2f} "
                       f"(median {s['median']:.1f}) over {s['episodes']} episodes")
