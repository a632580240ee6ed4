"""`trajdata sweep`: the whole scaling pipeline from one spec."""
from __future__ import annotations

import click

from trajdata.cli.options import dataclass_options


def _sweep_options(f):
    from trajdata.sweep.run import SweepOptions

    return dataclass_options(SweepOptions)(f)


@click.command("sweep")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Check the spec and print the plan and its cost; run nothing.")
@_sweep_options
def sweep_cmd(spec_path, dry_run, **flags):
    """Plan and run a scaling sweep: collect, train bc per size, eval every snapshot, fit, report.

    SPEC.toml names the data (or how to collect it), the model family and sizes, the FLOP budgets,
    the shared training settings and the eval episodes (see specs/cpu.toml, specs/paper-nethack.toml).
    family = "nethack-rl" sweeps `train rl` instead (C = 8ND, fitted on the return), and its [compare]
    adds a BC-initialised run at equal total compute (specs/cpu-rl.toml, specs/paper-rl.toml).
    Writes OUT/runs/<run>/, OUT/runs.csv, OUT/fit.json and OUT/report.html. Finished runs, snapshots and
    evaluations are not redone.
    """
    from trajdata.sweep.plan import load_spec
    from trajdata.sweep.run import SweepOptions, dry_run as plan_only, run_sweep

    opts = SweepOptions(**flags)
    spec = load_spec(spec_path)
    opts.out = opts.out or f"sweeps/{spec.name}"
    if dry_run:
        text, warning = plan_only(spec, opts)
        click.echo(text)
        if warning:
            click.echo(f"trajdata: warning: {warning}; the sweep will not start until it does", err=True)
        return
    r = run_sweep(spec, opts)
    if r.get("printed"):
        return
    click.echo(r["plan"])
    t = r["timings"]
    if "fit_error" in r:
        click.echo(f"no fit could run: {r['fit_error']}")
    click.echo(f"{opts.out}: {r['snapshots']} snapshots in {t['total_s']:.0f} s; runs table {r['runs_csv']}"
               + (f"; report {r['report']}" if "report" in r else ""))
