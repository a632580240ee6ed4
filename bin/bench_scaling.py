"""Scaling-fit benchmark on the paper authors' ~200 NetHack runs, side by side with anchors.

ours:    one full fit with CIs (isoFLOP + quadratic + Chinchilla for loss, isoFLOP + quadratic for
         return, return-vs-loss, rolling cross-validation), BLAS pinned to one thread.
anchors: (1) the same fit with the default BLAS threading; (2) Chinchilla by Hoffmann et al.'s
         procedure, L-BFGS-B from every one of the 4500 grid starts (ours refines the best 16);
         (3) the paper's Table 1 exponents.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from trajdata.scaling import REFERENCE_RUNS, FitConfig, fit_all, load_runs
from trajdata.scaling.fits import _fit_all, chinchilla_grid, fit_chinchilla, near_optimum

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--bootstrap", type=int, default=100)
    args = ap.parse_args()

    runs = load_runs(args.runs)
    cfg = FitConfig()
    res = {"runs": len(runs), "budgets": len(runs.budgets)}
    res["ours_full_fit_s"], fit = timed(lambda: fit_all(runs, cfg), repeat=3)
    res["anchor_full_fit_default_blas_threads_s"], _ = timed(lambda: _fit_all(runs, cfg, False))
    res["ours_bootstrap_s"], bs = timed(lambda: fit_all(runs, FitConfig(bootstrap=args.bootstrap)))
    res["bootstrap_resamples"] = args.bootstrap

    pr, pt = near_optimum(runs, runs.loss, fit["loss"]["isoflop"]["profiles"], cfg)
    with threadpool_limits(1):
        res["ours_chinchilla_s"], ours = timed(lambda: fit_chinchilla(pr, pt, cfg), repeat=3)
        full = FitConfig(grid_top_k=len(chinchilla_grid()))
        res["anchor_chinchilla_full_grid_s"], anchor = timed(lambda: fit_chinchilla(pr, pt, full))
    res["chinchilla_grid_starts"] = [cfg.grid_top_k, len(chinchilla_grid())]
    res["chinchilla_objective_ours_minus_full_grid"] = ours["objective"] - anchor["objective"]
    res["chinchilla_a_ours_vs_full_grid"] = [ours["a"]["value"], anchor["a"]["value"]]

    res["loss_budgets_kept"] = fit["loss"]["isoflop"]["budgets_kept"]
    res["exponents"] = {k: [round(e["value"], 4), round(e["ci"][0], 4), round(e["ci"][1], 4)]
                        for k, e in fit["summary"].items()}
    res["exponents_paper"] = PAPER
    res["bootstrap_ci"] = {k: [round(v["median"], 4)] + [round(c, 4) for c in v["ci"]]
                           for k, v in bs["bootstrap"].items()}
    res["crossval_best"] = {t: fit[t]["crossval"]["best_by_y_opt"] for t in ("loss", "return")}
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in res.items()) + "\n}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
