"""`trajdata sweep`: the whole scaling pipeline from one spec."""
from __future__ import annotations

import math

import click

from trajdata.cli.options import dataclass_options


def _sweep_options(f):
    from trajdata.sweep.run import SweepOptions

    return dataclass_options(SweepOptions)(f)
from trajdata.errors import ConfigError


@click.command("sweep")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan and its cost; run nothing.")
@click.option("--flops-per-s", default=None, type=float,
              help="--dry-run: training FLOP/s to turn the plan's compute into hours (e.g. 3e14 for an H100 at 30%).")
@_sweep_options
def sweep_cmd(spec_path, dry_run, flops_per_s, **flags):
    """Plan and run a scaling sweep: collect, train bc per size, eval every snapshot, fit, report.

    SPEC.toml names the data (or how to collect it), the model family and sizes, the FLOP budgets,
    the shared training settings and the eval episodes (see specs/cpu.toml, specs/paper-nethack.toml).
    family = "nethack-rl" sweeps `train rl` instead (C = 8ND, fitted on the return), and its [compare]
    adds a BC-initialised run at equal total compute (specs/cpu-rl.toml, specs/paper-rl.toml).
    Writes OUT/runs/<run>/, OUT/runs.csv, OUT/fit.json and OUT/report.html. Finished runs, snapshots and
    evaluations are not redone.
    """
    from trajdata.sweep.plan import describe, load_spec, make_plan
    from trajdata.sweep.run import SweepOptions, run_sweep

    if flops_per_s is not None and not (math.isfinite(flops_per_s) and flops_per_s > 0):
        raise ConfigError(f"--flops-per-s must be a positive finite number of FLOP/s, not {flops_per_s:g}",
                          field="flops_per_s")
    spec = load_spec(spec_path)
    if dry_run:
        click.echo(describe(make_plan(spec), flops_per_s))
        return
    opts = SweepOptions(**flags)
    opts.out = opts.out or f"sweeps/{spec.name}"
    r = run_sweep(spec, opts)
    if r.get("printed"):
        return
    click.echo(r["plan"])
    t = r["timings"]
    if "fit_error" in r:
        click.echo(f"no fit could run: {r['fit_error']}")
    click.echo(f"{opts.out}: {r['snapshots']} snapshots in {t['total_s']:.0f} s; runs table {r['runs_csv']}"
               + (f"; report {r['report']}" if "report" in r else ""))
