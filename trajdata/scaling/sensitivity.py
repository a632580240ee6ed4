"""The forecast under each reasonable fit setting, side by side, each with its interval.

Settings: the parabola window, vertex or observed optimum, the budget range (without the lowest or the
highest decade), the parametric fits' points, the isoFLOP regression's weights; each method
(isoFLOP, quadratic, Chinchilla) under each. A row is marked where its forecast lies outside the
default setting's interval for the same target and method.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from trajdata.errors import DataError
from trajdata.scaling.config import FitConfig
from trajdata.scaling.forecast import forecast, preferred
from trajdata.scaling.runs import Runs

ALT_DRAWS = 300


def settings(runs: Runs, cfg: FitConfig) -> list[tuple[str, dict, tuple[float, float] | None]]:
    """(label, FitConfig changes, FLOP range or None) for the default and each alternative."""
    lo, hi = float(runs.flops.min()), float(runs.flops.max())
    out = [("default", {}, None)]
    for w in sorted({2, 3, 5} - {cfg.window}):
        out.append((f"window ±{w}", {"window": w}, None))
    if cfg.window != 0:
        out.append(("window: all sizes", {"window": 0}, None))
    other = "argmin" if cfg.optimum == "vertex" else "vertex"
    out.append((f"optimum {other}", {"optimum": other}, None))
    if np.log10(hi / lo) > 2:
        out.append((f"budgets >= {10 * lo:.3g}", {}, (10 * lo, hi)))
        out.append((f"budgets <= {hi / 10:.3g}", {}, (lo, hi / 10)))
        out.append((f"window: all sizes, budgets >= {10 * lo:.3g}", {"window": 0}, (10 * lo, hi)))
    out.append((f"parametric points: {'all' if cfg.parametric_points == 'window' else 'window'}",
                {"parametric_points": "all" if cfg.parametric_points == "window" else "window"}, None))
    out.append((f"vertex weights: {'se' if cfg.vertex_weights == 'none' else 'none'}",
                {"vertex_weights": "se" if cfg.vertex_weights == "none" else "none"}, None))
    return out


def sensitivity(runs: Runs, cfg: FitConfig, refit, fit: dict | None = None, progress: bool = False,
                targets=("loss", "return"), **given) -> dict:
    """Forecast rows (with intervals) for every setting and method; ``refit(runs, cfg)`` is the fit
    (trajdata.scaling.fits.fit_all), ``fit`` the default setting's fit where already done. Rows outside the default's interval get ``outside_default`` True.
    The alternatives are bootstrapped with at most ``ALT_DRAWS`` draws (and not cross-validated)."""
    from tqdm import tqdm

    rows, failed = [], []
    default_ci, prefer = {}, {}
    plan = settings(runs, cfg)
    for label, change, frange in tqdm(plan, desc="sensitivity", leave=False, disable=not progress):
        if label == "default" and fit is not None:
            f = fit
        else:
            r = runs if frange is None else runs.subset((runs.flops >= frange[0]) & (runs.flops <= frange[1]))
            alt = label != "default"
            c = replace(cfg, sensitivity=False, cv_folds=0 if alt else cfg.cv_folds,
                        bootstrap=min(cfg.bootstrap, ALT_DRAWS) if alt else cfg.bootstrap, **change)
            try:
                f = refit(r, c)
            except DataError as e:
                failed.append({"setting": label, "reason": str(e)})
                continue
        if label == "default":
            prefer = {t: preferred(f, t) for t in ("loss", "return") if t in f}
        try:
            got = forecast(f, targets=targets, **given)
        except DataError as e:
            failed.append({"setting": label, "reason": str(e)})
            continue
        for row in got:
            key = (row["target"], row["method"])
            row = dict(row, setting=label)
            if label == "default":
                default_ci[key] = row["params_ci"]
            d = default_ci.get(key)
            if d is not None:
                row["outside_default"] = not d[0] <= row["params"] <= d[1]
                row["overlaps_default"] = bool(row["params_ci"][0] <= d[1] and d[0] <= row["params_ci"][1])
            rows.append(row)
    return {"given": {k: v for k, v in given.items() if v is not None}, "rows": rows, "failed": failed,
            "preferred": {t: {"method": m, "why": why} for t, (m, why) in prefer.items()}}


def sensitivity_lines(res: dict) -> list[str]:
    """The table `scaling forecast --sensitivity` prints."""
    lvl = None
    lines = []
    for t in ("loss", "return"):
        mine = [r for r in res["rows"] if r["target"] == t]
        if not mine:
            continue
        lvl = int(round(100 * mine[0]["ci_level"]))
        p = res["preferred"].get(t, {})
        lines.append(f"{t}: compute-optimal N ({lvl}% interval); * = outside the default's interval, "
                     f"! = intervals do not overlap; cross-validation prefers {p.get('method')} ({p.get('why')})")
        for r in mine:
            mark = "!" if r.get("overlaps_default") is False else ("*" if r.get("outside_default") else " ")
            last = (f"C {r['flops']:.3g} ({r['flops_ci'][0]:.3g}, {r['flops_ci'][1]:.3g})" if "reach" in r
                    else f"{t} {r[t]:.4g} ({r[t + '_ci'][0]:.4g}, {r[t + '_ci'][1]:.4g})")
            lines.append(f" {mark} {r['setting']:38s} {r['method']:10s} N {r['params']:9.3g} "
                         f"({r['params_ci'][0]:.3g}, {r['params_ci'][1]:.3g})  {last}")
    for f in res["failed"]:
        lines.append(f"   {f['setting']}: no forecast ({f['reason']})")
    return lines
