"""Compute-optimal forecasts from a fit: given D, C or N (or a loss/return to reach), the rest of the
compute-optimal run and the predicted loss/return, each with an interval: percentiles of the fit's
bootstrap draws solved the same way, or (for a fit without a bootstrap) the delta method on the fit's
covariance."""
from __future__ import annotations

import numpy as np
from scipy import stats

from trajdata.errors import ConfigError, DataError
from trajdata.scaling.config import BOOTSTRAP_MIN_SHARE
from trajdata.scaling.laws import chin_alloc, quad_alloc, quad_design

METHODS = ("isoflop", "quadratic", "chinchilla")
WARN_DECADES = 1.0     # a forecast this far (decades of C) outside the fitted FLOPs warns
REFUSE_DECADES = 3.0   # and this far is refused
GIVEN = {"dataset_size": "--dataset-size", "compute": "--compute", "params": "--params", "reach": "--reach"}
# ln C searched for the compute that reaches a --reach value: 1e3 .. 1e45 FLOPs, then bisection
REACH_GRID = np.linspace(np.log(1e3), np.log(1e45), 1681)


class NotCredible(DataError):
    """A forecast far outside the fitted FLOP range (``flops`` its C, ``decades`` how far)."""

    def __init__(self, message: str, flops: float, decades: float):
        super().__init__(message)
        self.flops, self.decades = flops, decades


def check_given(dataset_size=None, compute=None, params=None, reach=None) -> None:
    given = dict(dataset_size=dataset_size, compute=compute, params=params, reach=reach)
    if sum(v is not None for v in given.values()) != 1:
        raise ConfigError(f"give exactly one of {', '.join(GIVEN.values())}")
    for name, v in given.items():
        if v is not None and not (np.isfinite(v) and v > 0):
            raise ConfigError(f"{GIVEN[name]} must be a positive finite number, not {v:g}")


def solve_compute(alloc: dict, *, dataset_size=None, compute=None, params=None):
    """The budget C whose optimal allocation has the given D (or N), or C itself (arrays broadcast)."""
    check_given(dataset_size, compute, params)
    if compute is not None:
        return np.full(np.shape(alloc["a"]), float(compute))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if dataset_size is not None:
            return np.exp((np.log(dataset_size) - alloc["log_gd"]) / alloc["b"])
        return np.exp((np.log(params) - alloc["log_gn"]) / alloc["a"])


def solve_reach(method: str, f: dict, alloc: dict, P: np.ndarray | None, value: float, maximize: bool) -> np.ndarray:
    """Per row of P, the least C whose compute-optimal run is predicted to reach ``value`` (a return at
    least it, a loss at most it): the first crossing on ``REACH_GRID``, bisected. NaN where the row never
    reaches it within the grid, or reaches it already at the grid's low end."""
    def reached(lc):
        y = predict(method, f, alloc, P, np.exp(lc))
        return (y >= value) if maximize else (y <= value)

    ok = reached(np.broadcast_to(REACH_GRID, (len(alloc["a"]), len(REACH_GRID))))
    first = ok.argmax(1)
    hi, lo = REACH_GRID[first], REACH_GRID[np.maximum(first - 1, 0)]
    for _ in range(50):
        mid = (lo + hi) / 2
        good = reached(mid[:, None])[:, 0]
        hi, lo = np.where(good, mid, hi), np.where(good, lo, mid)
    return np.where(ok.any(1) & (first > 0), np.exp(hi), np.nan)


def allocations(method: str, P: np.ndarray, k: float) -> dict:
    """Per row of method parameters P (bootstrap.COLUMNS[method]): log_gn, a, log_gd, b."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "isoflop":
            g, a = P[:, 0], P[:, 1]
        elif method == "quadratic":
            g, a = quad_alloc(P.T, k)
        else:
            g, a = chin_alloc(P.T, k)
    return {"log_gn": g, "a": a, "log_gd": -np.log(k) - g, "b": 1 - a}


def predict(method: str, f: dict, alloc: dict, P: np.ndarray | None, C: np.ndarray) -> np.ndarray:
    """The target predicted at the compute-optimal allocation of budgets C (rows x budgets), per row of
    method parameters P (None: the point estimate, one row)."""
    C = np.asarray(C, float)
    g = {q: np.asarray(v, float)[:, None] for q, v in alloc.items()}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if method == "isoflop":
            yf = f["Y_opt"]
            if yf is None:
                return np.full(C.shape, np.nan)
            E, ya, yk = (np.array(yf["theta"])[:, None, None] if P is None else P[:, 2:].T[:, :, None])
            y = E + np.exp(ya - yk * (np.log(C) - yf["log_c0"]))
            return 1.0 / y if yf.get("inverse") else y
        lnN = g["log_gn"] + g["a"] * np.log(C)
        lnD = g["log_gd"] + g["b"] * np.log(C)
        if method == "quadratic":
            beta = np.array(f["beta"])[None] if P is None else P
            B = np.broadcast_to(beta, (len(lnN), beta.shape[1]))
            return np.exp(np.einsum("big,bi->bg", quad_design(lnN, lnD), B))
        th = np.array(f["theta"])[None] if P is None else P
        e, a, b, al, be = (v[:, None] for v in th.T)
        return np.exp(e) + np.exp(a - al * lnN) + np.exp(b - be * lnD)


def outcomes(method: str, f: dict, alloc: dict, P: np.ndarray | None, maximize: bool = False, **given) -> dict:
    """C, N, D and the predicted target at the optimum, per row of P (None: the point estimate)."""
    reach = given.pop("reach", None)
    C = (solve_reach(method, f, alloc, P, reach, maximize) if reach is not None
         else solve_compute(alloc, **given))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        N = np.exp(alloc["log_gn"]) * C ** alloc["a"]
        D = np.exp(alloc["log_gd"]) * C ** alloc["b"]
    y = predict(method, f, alloc, P, C[:, None])[:, 0]
    return {"flops": C, "params": N, "samples": D, "y": y}


def _delta_params(method: str, f: dict) -> tuple[np.ndarray, np.ndarray]:
    """The point parameters (as a bootstrap row) and their covariance."""
    if method == "isoflop":
        n = f["N_opt"]
        th = [n["intercept"]["value"], n["exponent"]["value"]]
        cov = np.zeros((5, 5))
        cov[:2, :2] = n["cov"]
        if f["Y_opt"] is not None:
            th += list(f["Y_opt"]["theta"])
            cov[2:, 2:] = f["Y_opt"]["cov"]
        else:
            th += [np.nan] * 3
        return np.array(th, float), cov
    key = "beta" if method == "quadratic" else "theta"
    return np.array(f[key], float), np.array(f["cov"], float)


def intervals(fit: dict, target: str, method: str, level: float, **given) -> dict:
    """[lo, hi] of flops, params, samples and the target: bootstrap percentiles where at least
    ``BOOTSTRAP_MIN_SHARE`` of the draws give a run (as for the exponents' headline), else the delta method."""
    f = fit[target][method]
    k = fit["config"]["flops_per_param_sample"]
    draws = (fit.get("bootstrap_draws") or {}).get(target, {}).get(method)
    keys = ("flops", "params", "samples", "y")
    why = " (the fit has no bootstrap draws)"
    if draws:
        P = np.array(draws["values"], float)
        out = outcomes(method, f, allocations(method, P, k), P, target == "return", **given)
        ok = np.all([np.isfinite(out[q]) & (out[q] > 0) for q in keys[:3]], 0)
        why = (f" (the bootstrap: only {int(ok.sum())} of {len(P)} draws "
               f"{'reach ' + format(given['reach'], '.4g') if given.get('reach') is not None else 'gave a run'})")
    if draws and ok.sum() >= BOOTSTRAP_MIN_SHARE * len(P):
        res = {}
        for q in keys:
            v = out[q][ok & np.isfinite(out[q])]
            res[q] = ([float(np.percentile(v, 50 * (1 - level))), float(np.percentile(v, 50 * (1 + level)))]
                      if len(v) else [float("nan")] * 2)
        res["how"] = f"bootstrap percentile, {int(ok.sum())} of {len(P)} draws"
        return res
    th, cov = _delta_params(method, f)
    h = 1e-6 * np.maximum(1.0, np.abs(th))
    rows = np.vstack([th] + [th + h[i] * np.eye(len(th))[i] for i in range(len(th))]
                     + [th - h[i] * np.eye(len(th))[i] for i in range(len(th))])
    out = outcomes(method, f, allocations(method, rows, k), rows, target == "return", **given)
    dof = len(f["budgets_kept"]) - 2 if method == "isoflop" else f["n"] - len(th)
    z = stats.t.ppf(0.5 + level / 2, dof) if dof > 0 else np.nan
    res = {}
    p = len(th)
    for q in keys:
        with np.errstate(divide="ignore", invalid="ignore"):
            lv = np.log(np.abs(out[q]))
        grad = np.nan_to_num((lv[1:p + 1] - lv[p + 1:]) / (2 * h))
        se = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
        with np.errstate(over="ignore"):
            res[q] = [float(np.exp(lv[0] - z * se) * np.sign(out[q][0])),
                      float(np.exp(lv[0] + z * se) * np.sign(out[q][0]))]
    res["how"] = f"delta method on the fit's covariance, t({dof}){why}"
    return res


def unreachable(method: str, f: dict, point: dict, target: str, value: float) -> str:
    """Why the point fit has no C reaching ``value``: its best prediction over ``REACH_GRID``, and where."""
    with np.errstate(invalid="ignore"):
        y = predict(method, f, point, None, np.exp(REACH_GRID)[None])[0]
    head = f"the {target} {method} fit never reaches {value:.4g}"
    if not np.isfinite(y).any():
        return f"{head}: it predicts no finite {target} at any C"
    i = int(np.nanargmax(y) if target == "return" else np.nanargmin(y))
    if (y[0] >= value) if target == "return" else (y[0] <= value):
        return f"the {target} {method} fit reaches {value:.4g} already at C = {np.exp(REACH_GRID[0]):.3g} FLOPs"
    if np.isclose(y[-1], y[i], rtol=1e-6):
        return f"{head}: it levels off at {y[i]:.4g} (C up to {np.exp(REACH_GRID[-1]):.3g} FLOPs)"
    return f"{head}: its best is {y[i]:.4g}, at C = {np.exp(REACH_GRID[i]):.3g} FLOPs"


def fitted_range(fit: dict) -> tuple[float, float]:
    return float(min(fit["budgets"])), float(max(fit["budgets"]))


def extrapolation(fit: dict, C: float) -> float:
    """Decades of C outside the fitted FLOP range (0 inside it)."""
    lo, hi = fitted_range(fit)
    return float(max(np.log10(C / hi), np.log10(lo / C), 0.0))


def forecast_one(fit: dict, target: str, method: str, max_extrapolation: float = REFUSE_DECADES, **given) -> dict:
    """One method's forecast for 'loss' (minimised) or 'return' (maximised), with intervals."""
    sec = fit.get(target)
    if sec is None:
        raise DataError(f"the fit has no {target} data ({fit.get(target + '_skipped', 'not fitted')})")
    f = sec.get(method)
    if f is None:
        status = sec.get("methods", {}).get(method)
        raise DataError(f"the {target} {method} fit did not run: {status['reason']}" if status
                        else f"fit has no {target} {method} result")
    alloc = f["allocation"]
    if any(v is None or not np.isfinite(v) for v in alloc.values()):
        raise DataError(f"the {target} {method} fit has no optimum to forecast with")
    point = {q: np.array([v], float) for q, v in alloc.items()}
    pt = outcomes(method, f, point, None, target == "return", **given)
    C, N, D, y = (float(pt[q][0]) for q in ("flops", "params", "samples", "y"))
    what = ", ".join(f"{q}={v:g}" for q, v in given.items() if v is not None)
    if given.get("reach") is not None and not np.isfinite(C):
        raise DataError(unreachable(method, f, point, target, given["reach"]))
    if not all(np.isfinite(v) and v > 0 for v in (C, N, D)):
        raise DataError(f"the {target} {method} fit gives no finite compute-optimal run for {what}")
    ext = extrapolation(fit, C)
    lo, hi = fitted_range(fit)
    where = (f"C = {C:.3g} FLOPs is {ext:.1f} decades {'above' if C > hi else 'below'} the fitted budgets "
             f"({lo:.3g} .. {hi:.3g})")
    if ext > max_extrapolation or N < 1 or D < 1 or not np.isfinite(y):
        raise NotCredible(f"the {target} {method} forecast for {what} is not credible: {where}, N = {N:.3g}, "
                        f"D = {D:.3g} (refused beyond {max_extrapolation:g} decades; --max-extrapolation)", C, ext)
    level = fit["config"].get("ci_level", 0.95)
    ci = intervals(fit, target, method, level, **given)
    out = {"target": target, "method": method, "flops": C, "params": N, "samples": D, target: y,
           "a": alloc["a"], "b": alloc["b"], "flops_ci": ci["flops"], "params_ci": ci["params"],
           "samples_ci": ci["samples"], f"{target}_ci": ci["y"], "ci_level": level, "interval": ci["how"],
           "extrapolation_decades": ext}
    if given.get("reach") is not None:
        out["reach"] = float(given["reach"])
    if ext > WARN_DECADES:
        out["warning"] = f"extrapolated: {where}"
    rvl = fit.get("return_vs_loss")
    if target == "loss" and rvl:
        out["return_from_loss"] = float(np.exp(rvl["log_c"]["value"]) * y ** rvl["delta"]["value"])
    return out


def forecast(fit: dict, methods=None, targets=("loss", "return"), max_extrapolation: float = REFUSE_DECADES,
             **given) -> list[dict]:
    """Forecasts for every method that ran, for each target present in `fit`.

    With no rows to give, the DataError says why for each target and method that was asked for."""
    check_given(**given)
    if not (np.isfinite(max_extrapolation) and max_extrapolation >= 0):
        raise ConfigError(f"--max-extrapolation must be >= 0 decades, not {max_extrapolation:g}")
    explicit = bool(methods)
    methods = methods or METHODS
    bad = set(methods) - set(METHODS)
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(sorted(bad))} (choose from {', '.join(METHODS)})")
    if given.get("reach") is not None and sum(t in fit for t in targets) > 1:
        raise ConfigError(f"--reach {given['reach']:g} is a loss or a return: say which with --target loss or "
                          "--target return")
    rows, why, far = [], [], []
    for t in targets:
        if t not in fit:
            if not any(u in fit for u in targets):
                why.append(f"the fit has no {t} data ({fit.get(t + '_skipped', 'not fitted')})")
            continue
        for m in methods:
            if m not in fit[t] and not explicit and m not in fit[t].get("methods", {}):
                continue
            try:
                rows.append(forecast_one(fit, t, m, max_extrapolation, **given))
            except NotCredible as e:
                far.append(e)
            except DataError as e:
                if len(methods) == 1 and m in fit[t]:
                    raise
                why.append(str(e))
    if not rows and far and not why:
        if len(far) == 1:
            raise far[0]
        lo, hi = fitted_range(fit)
        what = ", ".join(f"{q}={v:g}" for q, v in given.items() if v is not None)
        Cs = [e.flops for e in far]
        raise DataError(f"no credible forecast for {what}: the fits put C at {min(Cs):.3g} .. {max(Cs):.3g} FLOPs, "
                        f"{min(e.decades for e in far):.1f}+ decades outside the fitted budgets ({lo:.3g} .. {hi:.3g}); "
                        f"refused beyond {max_extrapolation:g} decades (--max-extrapolation)")
    if not rows:
        raise DataError("; ".join(why + [str(e) for e in far]) if why or far else "fit has none of the requested methods")
    for e in far:  # methods whose forecast lies too far out are left out, saying so
        rows[0].setdefault("left_out", []).append(str(e))
    return rows


def preferred(fit: dict, target: str) -> tuple[str | None, str]:
    """The method to act on for ``target`` and why: rolling cross-validation's best (lowest RMSE of the
    held-out optimum's target, as the paper recommends) where it scored >= 2 held-out budgets, else isoFLOP."""
    sec = fit.get(target) or {}
    cv = sec.get("crossval") or {}
    best = cv.get("best_by_y_opt")
    folds = sum(1 for r in cv.get("folds", []) if best in r)
    if best and folds >= 2 and (sec.get(best) or {}).get("optimum_exists", True):
        return best, f"rolling cross-validation prefers it ({folds} held-out budgets)"
    if "isoflop" in sec:
        return "isoflop", ("isoFLOP (cross-validation did not score >= 2 held-out budgets)" if not best
                           else f"isoFLOP (cross-validation scored {folds} held-out budget(s) only)")
    return None, "no method preferred"


# the paper's forecast-run schedule: cosine from 2e-4, 2000 warm-up steps, to 0.1x
FORECAST_SCHEDULE = dict(schedule="cosine", lr=2e-4, warmup_steps=2000, min_lr_ratio=0.1)


def pick(rows: list[dict], target: str = "loss", fit: dict | None = None) -> dict:
    """The forecast to act on: the method rolling cross-validation prefers (``preferred``) where
    ``fit`` is given, else the isoFLOP method's; else the first for ``target``."""
    mine = [r for r in rows if r["target"] == target] or rows
    want = preferred(fit, mine[0]["target"])[0] if fit is not None else "isoflop"
    return next((r for r in mine if r["method"] == want), next((r for r in mine if r["method"] == "isoflop"), mine[0]))


def train_bc_args(row: dict, dataset: str, out: str | None = None, **schedule) -> list[str]:
    """The `trajdata train bc` arguments of the compute-optimal model of forecast ``row``:
    ``--params N --samples D`` with the paper's forecast schedule (overridable)."""
    n, d = int(round(row["params"])), int(round(row["samples"]))
    sched = dict(FORECAST_SCHEDULE, **schedule)
    out = out or f"runs/forecast-N{n:.3g}-D{d:.3g}".replace("+", "")
    args = ["train", "bc", dataset, "--out", out, "--params", str(n), "--samples", str(d)]
    for k, v in sched.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def train_rl_args(row: dict, out: str | None = None) -> list[str]:
    """The `trajdata train rl` arguments of the compute-optimal agent of forecast ``row`` (a return
    fit of RL runs): ``--params N --steps D``."""
    n, d = int(round(row["params"])), int(round(row["samples"]))
    out = out or f"runs/forecast-rl-N{n:.3g}-D{d:.3g}".replace("+", "")
    return ["train", "rl", "--out", out, "--params", str(n), "--steps", str(d)]
