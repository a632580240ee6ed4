"""`trajdata sweep`: the whole scaling pipeline from one spec."""
from __future__ import annotations

import click



@click.command("sweep")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Sweep directory [default: sweeps/<spec name>]. Rerun to resume.")
@click.option("--dry-run", is_flag=True, help="Print the plan and its cost; run nothing.")
@click.option("--parallel", default=1, show_default=True, type=int, help="Training runs at once (local backend).")
@click.option("--backend", default="local", show_default=True, type=click.Choice(["local", "ray", "print"]),
              help="local processes, Ray tasks, or print the torchrun command of each run (for a cluster).")
@click.option("--ray-address", default=None, help="Ray cluster address (--backend ray).")
@click.option("--nproc-per-node", default=8, show_default=True, type=int, help="GPUs per printed torchrun command.")
@click.option("--threads", default=None, type=int, help="torch threads per training run [cores / --parallel].")
@click.option("--flops-per-s", default=None, type=float,
              help="--dry-run: training FLOP/s to turn the plan's compute into hours (e.g. 3e14 for an H100 at 30%).")
@click.option("--samples-per-s", default=None, type=float,
              help="--dry-run: training samples/s (all runs together) to turn the plan's samples into minutes "
                   "(CPU: the encoders set a sample's cost, whatever the size).")
@click.option("--skip-eval", is_flag=True, help="Fit loss only; no rollouts.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def sweep_cmd(spec_path, out, dry_run, parallel, backend, ray_address, nproc_per_node, threads, flops_per_s,
              samples_per_s, skip_eval, no_progress):
    """Plan and run a scaling sweep: collect, train bc per size, eval every snapshot, fit, report.

    SPEC.toml names the data (or how to collect it), the model family and sizes, the FLOP budgets,
    the shared training settings and the eval episodes (see specs/cpu.toml, specs/paper-nethack.toml).
    Writes OUT/runs/<run>/, OUT/runs.csv, OUT/fit.json and OUT/report.html. Finished runs, snapshots and
    evaluations are not redone.
    """
    from trajdata.sweep.plan import describe, load_spec, make_plan
    from trajdata.sweep.run import SweepOptions, run_sweep

    spec = load_spec(spec_path)
    if dry_run:
        click.echo(describe(make_plan(spec), flops_per_s, samples_per_s))
        return
    if ray_address and backend != "ray":
        raise click.UsageError("--ray-address needs --backend ray")
    opts = SweepOptions(out=out or f"sweeps/{spec.name}", parallel=parallel, backend=backend, ray_address=ray_address,
                        nproc_per_node=nproc_per_node, threads=threads, progress=not no_progress, skip_eval=skip_eval)
    r = run_sweep(spec, opts)
    if r.get("printed"):
        return
    click.echo(r["plan"])
    t = r["timings"]
    click.echo(f"{opts.out}: {r['snapshots']} snapshots in {t['total_s']:.0f} s; runs table {r['runs_csv']}"
               + (f"; report {r['report']}" if "report" in r else ""))
