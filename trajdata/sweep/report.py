"""The sweep's report: this project's own runs fitted (isoFLOP parabolas for loss and return, optimal
N and D power laws, return vs loss, a forecast), beside a reference runs table (the paper authors'
released runs) fitted the same way, with the plan, wall times and the expert / random baselines.
An RL sweep's runs are fitted on the return (C = 8ND), and its [compare] gets a section of its own:
from-scratch vs BC-initialised return at equal total compute."""
from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import numpy as np

from trajdata.scaling import REFERENCE_RUNS
from trajdata.scaling.fits import FitConfig, fit_all
from trajdata.scaling.forecast import forecast
from trajdata.scaling.report import build_figures, page, png, render_body, strict_json, table
from trajdata.scaling.runs import load_runs
from trajdata.errors import DataError
from trajdata.rl.config import HUMAN_SCORE
from trajdata.sweep.plan import Plan, dataset_path, describe
from trajdata.sweep.returns import seed_means, seed_scatter, size_name
from trajdata.sweep.timings import timing_totals
from trajdata.train import checkpoint as ckpt_io

DEFAULT_REFERENCE = REFERENCE_RUNS / "nethack_llama_isoflop.csv"


def plot_returns(plan: Plan, out: Path, baselines: dict):
    """Mean return ± SE of every snapshot against its FLOPs, one line per run, with the expert's and
    the random policy's returns on the same seeds; with [sweep] seeds each size's mean over its seeds
    is drawn bold and its seeds' runs thin."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("viridis")
    seeded = plan.spec.seeds is not None and len(plan.spec.seeds) > 1
    names = list(dict.fromkeys(size_name(r.name) if seeded else r.name for r in plan.active))
    color = {n: cmap(i / max(1, len(names) - 1)) for i, n in enumerate(names)}
    every = []
    for r in plan.active:
        rows = [x for x in ckpt_io.read_runs(out / "runs" / r.name / ckpt_io.RUNS_CSV) if x.get("return") not in (None, "")]
        if not rows:
            continue
        every += rows
        f = np.array([float(x["flops"]) for x in rows])
        m = np.array([float(x["return"]) for x in rows])
        se = np.array([float(x.get("return_se") or 0) for x in rows])
        o = np.argsort(f)
        name = size_name(r.name) if seeded else r.name
        ax.errorbar(f[o], m[o], yerr=se[o], marker="o", capsize=3, color=color[name],
                    **(dict(lw=0.8, alpha=0.45, ms=3, label=f"{r.name}") if seeded else
                       dict(label=f"{r.name} (N={r.params:,})")))
    if seeded:
        means = [m for m in seed_means(every) if len(m["seeds"]) > 1]
        for name in names:
            pts = sorted((m["budget"], m["return"], m["se"]) for m in means if m["run"] == name)
            if pts:
                f, m, se = (np.array(v) for v in zip(*pts))
                ax.errorbar(f, m, yerr=se, marker="o", lw=2.2, capsize=3, color=color[name],
                            label=f"{name}: mean of {len(plan.spec.seeds)} seeds")
    for key, style in (("expert", "--"), ("random", ":")):
        b = baselines.get(key)
        if b and b.get("episodes"):
            ax.axhline(b["mean"], ls=style, color="k", label=f"{key} ({b['policy']}): {b['mean']:.1f} ± {b['se']:.1f}")
            ax.axhspan(b["mean"] - b["se"], b["mean"] + b["se"], color="k", alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("mean return (± SE)")
    ax.set_title("Return of every snapshot, same seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def best_returns(rows: list[dict]) -> list[dict]:
    """Per FLOP budget, the size with the highest mean return over its training seeds (``seed_means``),
    smallest budget first. The observed best, biased up by the choice among sizes; it stands where the
    return's parabolas have no vertex."""
    best: dict[float, dict] = {}
    for m in seed_means(rows):
        if m["budget"] not in best or m["return"] > best[m["budget"]]["return"]:
            best[m["budget"]] = m
    return [best[c] for c in sorted(best)]


def best_return_html(best: list[dict]) -> str:
    """The observed best return per budget, and how far apart the largest and smallest budgets' are in SE."""
    if len(best) < 2:
        return ""
    lo, hi = best[0], best[-1]
    se = float(np.hypot(lo["se"], hi["se"]))
    gap = hi["return"] - lo["return"]
    z = f"{gap / se:.1f} SE" if se > 0 else "no SE"
    seeds = any(len(b.get("seeds", ())) > 1 for b in best)
    rows = [[f"{b['budget']:.3g}", b["run"], f"{b['params']:,}", f"{b['return']:.2f} ± {b['se']:.2f}"]
            + ([", ".join(f"{x:.1f}" for x in b["seeds"])] if seeds else []) for b in best]
    return ("<h2>Best return per budget</h2><p>The size with the highest mean return at each budget (the "
            "observed best: biased up by the choice among sizes; the isoFLOP return fit below uses the "
            "parabolas' vertices where they exist)"
            + ("; a size's return is the mean over its training seeds, ± the eval SE of that mean" if seeds else "")
            + f". Largest budget minus smallest: {gap:+.2f} ({z}).</p>"
            + table(rows, ["budget", "run", "params", "mean return ± SE"] + (["each seed"] if seeds else [])))


def seed_scatter_html(sc: dict | None) -> str:
    if sc is None:
        return ""
    return (f"<p>Training seeds: over {sc['cells']} (budget, size) cells the seeds' returns differ by a median "
            f"{sc['median_range']:.1f}; chi² about their means / degrees of freedom = {sc['ratio']:.2f} "
            "(1 if the eval noise alone explained them). The ± in these tables count eval noise only; "
            f"training seeds widen them by about √{max(sc['ratio'], 1):.2f} = {np.sqrt(max(sc['ratio'], 1)):.2f}x.</p>")


def _fit(path: Path, cfg: FitConfig) -> dict:
    runs = load_runs(path)
    return fit_all(runs, cfg)


def _forecast_html(fit: dict, **given) -> str:
    """Each method's forecast with its interval, or why there is none."""
    from trajdata.scaling.report import forecast_table

    try:
        return forecast_table(forecast(fit, **given))
    except Exception as e:  # a fit with no optimum: say why
        return f"<p>No forecast: {html.escape(str(e))}</p>"


def reach_section(fit: dict, reach: float, rl: bool) -> str:
    """The compute whose compute-optimal run is predicted to reach return ``reach``, by each return fit,
    however far out (each row says how far), beside the paper's RL forecast of the human score."""
    human = reach == HUMAN_SCORE
    what = f"the average human score ({reach:,.0f}, Hambro et al. 2022)" if human else f"a return of {reach:,.4g}"
    paper = ("<p>The paper's forecast of it for RL from scratch (Table 6): isoFLOP N 4.4B, D 13.2T (C = 4.6e23); "
             "parametric N 67B, D 0.93T (C = 5.0e23).</p>" if human and rl else "")
    return (f"<h2>Compute to reach {html.escape(what)}</h2><p>The least C whose compute-optimal run each return fit "
            "predicts to reach it (<code>trajdata scaling forecast RUNS --reach VALUE --target return</code>), with "
            "intervals as every forecast's, shown however far past the budgets it lies: the interval column says how far."
            "</p>" + _forecast_html(fit, targets=("return",), max_extrapolation=100.0, reach=reach) + paper)


def write_sweep_report(plan: Plan, out: Path, baselines: dict, timings: dict) -> tuple[str, str | None]:
    """Fit the sweep's runs.csv and the reference table; write OUT/{fit.json,reference_fit.json,report.html}.
    Returns the report's path and, where no fit of the sweep's runs could run, why (the report says it too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflowing extrapolations of poor fits
        return _write_report(plan, out, baselines, timings)


def fit_config(spec) -> FitConfig:
    """The spec's [fit] table; RL counts C = 8ND unless it says otherwise."""
    return FitConfig(**({"flops_per_param_sample": 8.0} if spec.rl else {}), **spec.fit)


def _write_report(plan: Plan, out: Path, baselines: dict, timings: dict) -> tuple[str, str | None]:
    spec = plan.spec
    try:
        own, error = _fit(out / "runs.csv", fit_config(spec)), None
    except DataError as e:  # too few or too poor runs for any fit: the rest of the report still stands
        own, error = None, str(e)
    (out / "fit.json").unlink(missing_ok=True)
    if own is not None:
        (out / "fit.json").write_text(json.dumps(strict_json(own), indent=1, allow_nan=False))
    ref_path = Path(spec.report.get("reference") or ("" if spec.rl else DEFAULT_REFERENCE))  # no RL runs released
    ref = _fit(ref_path, FitConfig(**spec.report.get("reference_fit", {}))) if ref_path.is_file() else None
    if ref is not None:
        (out / "reference_fit.json").write_text(json.dumps(strict_json(ref), indent=1, allow_nan=False))
    ds_steps = None
    if not spec.rl:
        from trajdata.format.dataset import Dataset

        ds_steps = int(sum(int(r["steps"]) for r in Dataset(dataset_path(spec, out)).index_rows()))
    parts = _header(plan, out, baselines, timings, ds_steps)
    if own is None:
        parts.append(f"<h1>This project's runs ({html.escape(spec.name)})</h1><p>No fit could run: "
                     f"{html.escape(error)}</p>")
    else:
        parts.append(render_body(own, build_figures(own), title=f"This project's runs ({spec.name})"))
    if own is not None and ds_steps is not None:
        parts.append("<h2>Forecast</h2><p>The compute-optimal run for this sweep's dataset "
                     f"(D = {ds_steps:,} steps), by each method that ran:</p>"
                     + _forecast_html(own, dataset_size=float(ds_steps)))
    reach = spec.report.get("reach", HUMAN_SCORE if spec.rl else None)
    if own is not None and reach is not None and "return" in own:
        parts.append(reach_section(own, float(reach), spec.rl))
    if plan.compare is not None and (out / "compare.csv").is_file():
        from trajdata.sweep.compare import comparison_section

        parts.append(comparison_section(plan, out, baselines))
    if ref is not None:
        parts.append(render_body(ref, build_figures(ref), title=f"Reference: {ref_path.name}, fitted the same way"))
        parts.append("<h2>Reference forecast</h2><p>At the paper's 40B-sample dataset:</p>"
                     + _forecast_html(ref, dataset_size=40e9))
    (out / "report.html").write_text(page(f"trajdata sweep {spec.name}", "".join(parts)))
    return str(out / "report.html"), error


def wall_times(out: Path, timings: dict) -> str:
    """This invocation's phase times and, for a resumed sweep, each phase summed over every invocation
    (OUT/timings.jsonl)."""
    def fmt(t: dict) -> str:
        return ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items() if k != "total_s")

    n, totals = timing_totals(out)
    if n <= 1:
        return f"Wall time: {fmt(timings)}."
    return f"Wall time, this invocation: {fmt(timings)}; all {n} invocations into this directory: {fmt(totals)}."


def _header(plan: Plan, out: Path, baselines: dict, timings: dict, ds_steps: int | None) -> list[str]:
    """The report's title, plan, wall times and baselines, with every snapshot's return."""
    spec = plan.spec
    parts = [f"<h1>trajdata sweep <code>{html.escape(spec.name)}</code></h1>",
             f"<p>{len(plan.active)} runs ({spec.family}), {plan.snapshots} snapshots, {plan.compute:.3g} training FLOPs "
             + (f"planned; dataset {ds_steps:,} steps. " if ds_steps is not None else
                "planned (C = 8ND, D env steps). ") + wall_times(out, timings) + "</p>",
             f"<pre>{html.escape(describe(plan))}</pre>"]
    if baselines:
        rows = [[k, b["policy"], b["episodes"], f"{b['mean']:.2f} ± {b['se']:.2f}", f"{b['median']:.1f}"]
                for k, b in baselines.items()]
        parts.append("<h2>Baselines on the eval seeds</h2>"
                     + table(rows, ["baseline", "policy", "episodes", "mean return ± SE", "median"]))
        parts.append(f"<img src='data:image/png;base64,{plot_returns(plan, out, baselines)}'>")
        runs_csv = out / ckpt_io.RUNS_CSV
        if runs_csv.is_file():
            rows = ckpt_io.read_runs(runs_csv)
            parts.append(best_return_html(best_returns(rows)) + seed_scatter_html(seed_scatter(rows)))
    return parts
