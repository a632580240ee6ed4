"""Scaling-fit benchmark on the paper authors' ~200 NetHack runs, side by side with anchors.

ours:    one full fit with CIs (isoFLOP + quadratic + Chinchilla for loss, isoFLOP + quadratic for
         return, return-vs-loss, rolling cross-validation), BLAS pinned to one thread; the same with
         the default 1000-draw bootstrap (vectorised over draws); the coverage of the reported
         intervals on seeded tables from a known law (trajdata.scaling.synthetic).
anchors: (1) the same fit with the default BLAS threading; (2) Chinchilla by Hoffmann et al.'s
         procedure, L-BFGS-B from every one of the 4500 grid starts (ours refines the best 16);
         (3) the paper's Table 1 exponents; (4) a bootstrap that refits each draw with the point
         fits (one draw at a time, as before vectorising), timed on a few draws and scaled to 1000.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

import numpy as np

from trajdata.scaling import REFERENCE_RUNS, FitConfig, fit_all, load_runs
from trajdata.scaling.fits import _fit_all, chinchilla_grid, fit_chinchilla, fit_target, near_optimum

RUNS = REFERENCE_RUNS / "nethack_llama_isoflop.csv"
PAPER = {"loss.isoflop.a": [0.61, 0.52, 0.71], "loss.quadratic.a": [0.590, 0.587, 0.593],
         "return.isoflop.a": [0.51, 0.43, 0.59], "return.quadratic.a": [0.605, 0.601, 0.610],
         "return_vs_loss.delta": [-2.42, None, None]}


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def loop_bootstrap_s(runs, draws: int) -> float:
    """Seconds per draw of a bootstrap that resamples runs within budgets and reruns the point fits."""
    rng = np.random.default_rng(0)
    sub = FitConfig(bootstrap=0, grid_top_k=4)
    groups = [np.flatnonzero(runs.flops == c) for c in runs.budgets]
    with threadpool_limits(1):
        t = time.perf_counter()
        for _ in range(draws):
            r = runs.subset(np.concatenate([rng.choice(g, len(g)) for g in groups]))
            fit_target(r, r.loss, sub, crossval=False)
            rr = r.subset(np.isfinite(r.ret))
            fit_target(rr, rr.ret, sub, maximize=True, crossval=False)
        return (time.perf_counter() - t) / draws


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--bootstrap", type=int, default=FitConfig().bootstrap)
    ap.add_argument("--loop-draws", type=int, default=10, help="draws the one-at-a-time anchor is timed on")
    ap.add_argument("--coverage-tables", type=int, default=200)
    args = ap.parse_args()

    runs = load_runs(args.runs)
    cfg = FitConfig(bootstrap=0)
    res = {"runs": len(runs), "budgets": len(runs.budgets)}
    res["ours_full_fit_s"], fit = timed(lambda: fit_all(runs, cfg), repeat=3)
    res["anchor_full_fit_default_blas_threads_s"], _ = timed(lambda: _fit_all(runs, cfg, False))
    res["ours_full_fit_with_bootstrap_s"], bs = timed(lambda: fit_all(runs, FitConfig(bootstrap=args.bootstrap)))
    res["bootstrap_draws"] = args.bootstrap
    res["anchor_loop_bootstrap_s_scaled"] = round(loop_bootstrap_s(runs, args.loop_draws) * args.bootstrap, 1)

    pr, pt = near_optimum(runs, runs.loss, fit["loss"]["isoflop"]["profiles"], cfg)
    with threadpool_limits(1):
        res["ours_chinchilla_s"], ours = timed(lambda: fit_chinchilla(pr, pt, cfg), repeat=3)
        full = FitConfig(grid_top_k=len(chinchilla_grid()))
        res["anchor_chinchilla_full_grid_s"], anchor = timed(lambda: fit_chinchilla(pr, pt, full))
    res["chinchilla_grid_starts"] = [cfg.grid_top_k, len(chinchilla_grid())]
    res["chinchilla_objective_ours_minus_full_grid"] = ours["objective"] - anchor["objective"]
    res["chinchilla_a_ours_vs_full_grid"] = [ours["a"]["value"], anchor["a"]["value"]]

    res["loss_budgets_kept"] = fit["loss"]["isoflop"]["budgets_kept"]
    # Table 1 side by side: [value, lo, hi] of ours (bootstrap, then OLS/delta method) and the paper's
    res["exponents_bootstrap"] = {k: [round(e["value"], 4)] + [round(c, 4) for c in e["ci"]]
                                  for k, e in bs["summary"].items()}
    res["exponents_ols_delta"] = {k: [round(e["value"], 4)] + [round(c, 4) for c in e["ci"]]
                                  for k, e in fit["summary"].items()}
    res["exponents_paper"] = PAPER
    res["crossval_best"] = {t: fit[t]["crossval"]["best_by_y_opt"] for t in ("loss", "return")}
    if args.coverage_tables:
        from trajdata.scaling.synthetic import coverage

        t = time.perf_counter()
        cov = coverage(tables=args.coverage_tables, bootstrap=200)
        res["coverage_grid_s"] = round(time.perf_counter() - t, 1)
        res["coverage_grid"] = {k: cov[k] for k in ("tables", "bootstrap", "coverage", "median_a_ci_width")}
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in res.items()) + "\n}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
