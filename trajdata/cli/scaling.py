"""`trajdata scaling fit` and `trajdata scaling forecast`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trajdata.cli.options import dataclass_options
from trajdata.errors import ConfigError, DataError
from trajdata.scaling.fits import FitConfig, fit_all
from trajdata.scaling.forecast import METHODS, REFUSE_DECADES, WARN_DECADES, forecast
from trajdata.scaling.runs import COLUMN_ALIASES, load_runs, parse_budgets


def _pairs(values, flag):
    out = {}
    for v in values:
        if "=" not in v:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k.strip()] = val.strip()
    return out


def runs_options(f):
    """Options that choose columns, rows and budgets of a runs table, and every FitConfig field."""
    roles = ", ".join(f"{r} ({'/'.join(a)})" for r, a in COLUMN_ALIASES.items())
    options = [
        click.option("--col", "cols", multiple=True, metavar="ROLE=NAME",
                     help=f"Column for a role; default: first alias present. Roles: {roles}."),
        click.option("--where", "wheres", multiple=True, metavar="COL=VALUE",
                     help="Keep only rows with COL equal to VALUE (e.g. game=Breakout)."),
        click.option("--budgets", default=None, metavar="C1,C2,...", help="Keep only these FLOP budgets."),
        click.option("--min-budget", default=None, type=float, help="Drop budgets below this."),
        click.option("--max-budget", default=None, type=float, help="Drop budgets above this."),
    ]
    f = dataclass_options(FitConfig)(f)
    for opt in reversed(options):
        f = opt(f)
    return f


def dropped_line(fit: dict) -> str | None:
    """One line on the runs left out for NaN/inf values, or None when there were none."""
    d = fit.get("dropped_non_finite") or {}
    parts = []
    if d.get("n"):
        cols = ", ".join(f"{c}: {n}" for c, n in d["by_column"].items())
        parts.append(f"dropped {d['n']} of {d['of']} runs with NaN/inf values ({cols})")
    if fit.get("dropped_duplicates"):
        parts.append(f"{fit['dropped_duplicates']} rows repeated verbatim were counted once")
    n_ret = fit.get("n_runs_with_return")
    if n_ret is not None and n_ret < fit["n_runs"]:
        parts.append(f"{fit['n_runs'] - n_ret} runs without a finite return are left out of the return fits")
    return "; ".join(parts) or None


def method_lines(fit: dict) -> list[str]:
    """One line for each method that did not run, and for return fits that were skipped."""
    lines = [f"{t}.{m}: not run: {st['reason']}" for t in ("loss", "return") if t in fit
             for m, st in fit[t]["methods"].items() if not st["ran"]]
    if "return_skipped" in fit and fit["config"]["fit_return"]:
        lines.append(f"return: not fitted: {fit['return_skipped']}")
    return lines


def load_and_config(runs_path, cols=(), wheres=(), budgets=None, min_budget=None, max_budget=None, **fit):
    """The runs table (columns, rows and budgets chosen) and the FitConfig of ``fit``'s fields."""
    runs = load_runs(runs_path, _pairs(cols, "--col"), _pairs(wheres, "--where"))
    chosen = parse_budgets(budgets)
    if chosen is not None:
        runs = runs.with_budgets(chosen)
    lo, hi = min_budget or 0.0, max_budget or float("inf")
    runs = runs.subset((runs.flops >= lo) & (runs.flops <= hi))
    if len(runs) == 0:
        raise ConfigError("no runs left after --min-budget/--max-budget")
    return runs, FitConfig(**fit)


def progress_bars() -> bool:
    """tqdm bars only where someone watches them: stderr a terminal."""
    return sys.stderr.isatty()


def interval_line(fit: dict) -> str:
    """Which interval the exponents above are."""
    bs = fit.get("bootstrap")
    if bs:
        return (f"intervals: {int(round(100 * fit['config']['ci_level']))}% bootstrap percentile, {bs['draws']} draws "
                f"(validation noise: {'; '.join(f'{t}: {v}' for t, v in bs['validation_noise'].items())}; "
                "run and budget scatter from the residuals)")
    return "intervals: OLS t-interval (isoFLOP) and delta method (parametric); no bootstrap (--bootstrap 0)"


@click.command("fit")
@click.argument("runs_path", metavar="RUNS", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for fit.json and report.html.")
@runs_options
def fit_cmd(runs_path, out, **opts):
    """Fit isoFLOP profiles, parametric laws and return-vs-loss to RUNS (CSV or Parquet).

    RUNS has one row per evaluated checkpoint: FLOPs, params, samples, loss (+ its SE),
    optionally mean return (+ SE, episodes); a table without a loss (RL runs, C = 8ND: give
    --flops-per-param-sample 8) is fitted on the return alone. Writes OUT/fit.json (every
    coefficient with CIs) and OUT/report.html (self-contained, plots embedded).
    """
    from trajdata.scaling.report import write_report

    runs, cfg = load_and_config(runs_path, **opts)
    result = fit_all(runs, cfg, progress=progress_bars())
    paths = write_report(result, out)
    for key, e in result["summary"].items():
        click.echo(f"{key:28s} {e['value']:8.3f}  ({e['ci'][0]:.3f}, {e['ci'][1]:.3f})")
    click.echo(interval_line(result))
    for line in method_lines(result):
        click.echo(line)
    if "binning" in result:
        b = result["binning"]
        click.echo(f"binned {b['budgets_before']} FLOP budgets into {b['budgets_after']} "
                   f"({b['bins_per_decade']:g} per decade)")
    t = "loss" if "loss" in result else "return"
    if "isoflop" in result.get(t, {}):
        kept = result[t]["isoflop"]["budgets_kept"]
        click.echo(f"{t} budgets kept: {len(kept)} of {len(result['budgets'])} ({min(kept):.3g} .. {max(kept):.3g})")
    k, ratio = result["config"]["flops_per_param_sample"], result["median_flops_per_param_sample"]
    if not 0.8 <= ratio / k <= 1.25:
        click.echo(f"note: the runs' median C/(N·D) is {ratio:.3g} but k = {k:g} (--flops-per-param-sample; "
                   "RL runs count C = 8ND)")
    line = dropped_line(result)
    if line:
        click.echo(line)
    if "sensitivity" in result:
        from trajdata.scaling.sensitivity import sensitivity_lines

        click.echo(f"forecasts at C = {result['sensitivity']['given']['compute']:.3g} under each setting:")
        for line in sensitivity_lines(result["sensitivity"]):
            click.echo(line)
    click.echo(f"wrote {paths['json']} and {paths['html']}")


def print_forecasts(rows: list[dict], sens: dict | None) -> None:
    """The forecast table, each figure with its interval, then the sensitivity lines."""
    lvl = int(round(100 * rows[0]["ci_level"]))
    click.echo(f"{'target':7s} {'method':10s} {'FLOPs (' + str(lvl) + '% interval)':>30s} "
               f"{'params':>30s} {'samples':>30s} {'predicted':>28s}")

    def cell(v, ci, f=".3g", w=30):
        return f"{f'{v:{f}} ({ci[0]:{f}}, {ci[1]:{f}})':>{w}s}"

    for r in rows:
        t = r["target"]
        pred = f"{r['reach']:.4g} (given)".rjust(28) if "reach" in r else cell(r[t], r[t + '_ci'], '.4g', 28)
        click.echo(f"{t:7s} {r['method']:10s} {cell(r['flops'], r['flops_ci'])} {cell(r['params'], r['params_ci'])} "
                   f"{cell(r['samples'], r['samples_ci'])} {pred}")
    click.echo(f"intervals: {rows[0]['interval']}")
    if sens is not None:
        from trajdata.scaling.sensitivity import sensitivity_lines

        for line in sensitivity_lines(sens):
            click.echo(line)


@click.command("forecast")
@click.argument("source", metavar="FIT_JSON_OR_RUNS", type=click.Path(dir_okay=False))
@click.option("--dataset-size", type=float, default=None, help="Samples D you have: solve C, then N.")
@click.option("--compute", type=float, default=None, help="FLOP budget C: the optimal N and D.")
@click.option("--params", type=float, default=None, help="Model size N: solve C, then D.")
@click.option("--reach", type=float, default=None, metavar="VALUE",
              help="A loss (or return, with --target return) to reach: the least C whose compute-optimal run is "
                   "predicted to reach it, then N and D (the paper's RL forecast of the average human score: "
                   "--reach 127000).")
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS),
              help="Fit(s) to forecast with (default: all present).")
@click.option("--target", type=click.Choice(["loss", "return", "both"]), default="both", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--dataset", default=None, type=click.Path(file_okay=False),
              help="Dataset for the printed `train bc` command of the compute-optimal model (needed by --run).")
@click.option("--run-out", default=None, type=click.Path(file_okay=False), help="--out of that run [runs/forecast-...].")
@click.option("--run", "start", is_flag=True, help="Start that run now (`train bc`; `train rl` for a fit of RL runs, which have no loss).")
@click.option("--max-extrapolation", default=REFUSE_DECADES, show_default=True, type=float, metavar="DECADES",
              help=f"Refuse forecasts whose C lies more than this many decades outside the fitted FLOP budgets "
                   f"(beyond {WARN_DECADES:g} decade they warn).")
@runs_options
def forecast_cmd(source, dataset_size, compute, params, reach, methods, target, as_json, dataset, run_out, start,
                 max_extrapolation, sensitivity, **opts):
    """Compute-optimal N, D, C and predicted loss/return from a fit JSON (or a RUNS file, fitted first).

    Each comes with its interval: percentiles of the fit's bootstrap draws solved the same way (the
    delta method for a fit without them). Give exactly one of --dataset-size, --compute, --params, --reach;
    e.g. `--dataset-size 40e9`, or `--reach 127000 --target return` for the compute to the average human score.
    """
    from trajdata.scaling.forecast import check_given

    check_given(dataset_size, compute, params, reach)  # before a fit that may take a while
    path = Path(source)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if sensitivity and path.suffix.lower() == ".json":
        raise ConfigError("--sensitivity refits the runs under each setting: give the RUNS table, not a fit JSON")
    runs = None
    if path.suffix.lower() == ".json":
        try:
            fit = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})")
        if not isinstance(fit, dict) or not ("loss" in fit or "return" in fit):
            raise DataError(f"{path} is not a trajdata scaling fit (no 'loss' or 'return' section)")
    else:
        runs, cfg = load_and_config(source, **opts)
        fit = fit_all(runs, cfg, progress=progress_bars())
        line = dropped_line(fit)
        if line:
            click.echo(line, err=True)
    targets = ("loss", "return") if target == "both" else (target,)
    given = dict(dataset_size=dataset_size, compute=compute, params=params, reach=reach)
    rows = forecast(fit, methods or None, targets, max_extrapolation, **given)
    rl = "loss" not in fit  # a fit of returns alone is one of RL runs: its compute-optimal run is a `train rl`
    if start and not dataset and not rl:
        raise ConfigError("--run needs --dataset (the data to train the forecast model on)")
    for r in rows:
        if "warning" in r:
            click.echo(f"warning: {r['target']} {r['method']}: {r['warning']}", err=True)
        for note in r.get("left_out", []):
            click.echo(f"warning: left out: {note}", err=True)
    sens = None
    if sensitivity:
        from trajdata.scaling.sensitivity import sensitivity as run_sensitivity

        sens = run_sensitivity(runs, cfg, fit_all, fit=fit, progress=progress_bars(), targets=targets, **given)
    if as_json:
        click.echo(json.dumps(rows if sens is None else {"forecasts": rows, "sensitivity": sens}, indent=1))
    else:
        print_forecasts(rows, sens)
    from trajdata.scaling.forecast import pick, preferred, train_bc_args, train_rl_args

    want = "loss" if target in ("loss", "both") else "return"
    best = pick(rows, want, fit)
    args = train_rl_args(best, run_out) if rl else train_bc_args(best, dataset or "DATASET", run_out)
    if not as_json:
        import shlex

        t = best["target"]
        pm, why = preferred(fit, t)
        why = why if best["method"] == pm else "the method asked for"
        click.echo(f"compute-optimal run ({t} {best['method']}, {why}): trajdata {shlex.join(args)}")
        click.echo(f"  N {best['params']:.3g} ({best['params_ci'][0]:.3g}, {best['params_ci'][1]:.3g}), "
                   f"D {best['samples']:.3g}, C {best['flops']:.3g} ({best['flops_ci'][0]:.3g}, {best['flops_ci'][1]:.3g}); "
                   + (f"to reach {t} {best['reach']:.4g}" if "reach" in best else
                      f"predicted {t} {best[t]:.4g} ({best[t + '_ci'][0]:.4g}, {best[t + '_ci'][1]:.4g})"))
    if start:
        click.get_current_context().find_root().command.main(args, prog_name="trajdata")

