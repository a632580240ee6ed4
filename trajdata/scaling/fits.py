"""Scaling-law fits: isoFLOP profiles, parametric fits (quadratic, Chinchilla), return-vs-loss.

Notation: N params, D samples, C = k·N·D FLOPs (k = 6 for Transformers), x = ln N, y = ln D.
Every fit returns a JSON-able dict; an estimate is {"value", "se", "ci": [lo, hi]}.
An allocation rule is N_opt = exp(log_gn)·C^a, D_opt = exp(log_gd)·C^b (natural logs).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, replace

import numpy as np
from scipy import optimize, stats
from scipy.special import logsumexp, softmax
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from trajdata.errors import DataError
from trajdata.scaling.config import BOOTSTRAP_MIN_SHARE, FitConfig
from trajdata.scaling.laws import PARAMETRIC, chin_alloc, quad_alloc, quad_design
from trajdata.scaling.runs import Runs

def estimate(value: float, se: float, level: float, dof: int | None = None) -> dict:
    q = stats.t.ppf(0.5 + level / 2, dof) if dof else stats.norm.ppf(0.5 + level / 2)
    se = float(se) if np.isfinite(se) else float("nan")
    q = float(q) if np.isfinite(q) else float("nan")
    return {"value": float(value), "se": se, "ci": [float(value - q * se), float(value + q * se)]}


def delta_method(fun, theta: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    """Value and SE of fun(theta) from a first-order Taylor expansion (central differences)."""
    theta = np.asarray(theta, float)
    grad = np.empty_like(theta)
    for i in range(len(theta)):
        h = 1e-6 * max(1.0, abs(theta[i]))
        up, dn = theta.copy(), theta.copy()
        up[i] += h
        dn[i] -= h
        grad[i] = (fun(up) - fun(dn)) / (2 * h)
    return float(fun(theta)), float(np.sqrt(max(grad @ cov @ grad, 0.0)))


def ols(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Least squares with the classical covariance sigma^2 (X'X)^-1; returns beta, cov, dof.

    With weights ``w`` (inverse variances): weighted least squares with the Knapp-Hartung covariance
    (X'WX)^-1 · sum(w r²) / dof."""
    if w is None:
        w = np.ones(len(y))
    sw = np.sqrt(w)
    beta, *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    dof = len(y) - X.shape[1]
    resid = y - X @ beta
    s2 = (w * resid) @ resid / dof if dof > 0 else np.nan
    cov = s2 * np.linalg.pinv((X * w[:, None]).T @ X)
    return beta, cov, dof


def excess_variance(resid: np.ndarray, se: np.ndarray | None, dof_frac: np.ndarray | float, dof: int) -> float:
    """Variance of the scatter that the SEs do not explain: max(0, (sum r² - sum (1-h)·se²) / dof),
    with 1-h each point's share of the residual degrees of freedom (all of it when there are no SEs)."""
    if dof <= 0:
        return 0.0
    meas = 0.0 if se is None else float(np.sum(dof_frac * np.square(se)))
    return max(0.0, (float(resid @ resid) - meas) / dof)


def _leverage(X: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jk,ik->i", X, np.linalg.pinv(X.T @ X), X)


# ---------------------------------------------------------------- isoFLOP profiles

def bin_budgets(runs: Runs, per_decade: float) -> Runs:
    """Runs with each FLOP count snapped to the geometric centre 10^(i/per_decade) of its bin."""
    if per_decade <= 0:
        return runs
    i = np.round(np.log10(runs.flops) * per_decade)
    return replace(runs, flops=10.0 ** (i / per_decade))


def _cells(flops, params, target):
    """Mean target per (budget, size) cell: repeated seeds count once."""
    keys = np.stack([flops, params], 1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.ravel()
    mean = np.bincount(inv, weights=target) / np.bincount(inv)
    return uniq[:, 0], uniq[:, 1], mean


def isoflop_profiles(runs: Runs, target: np.ndarray, cfg: FitConfig, maximize: bool = False,
                     se: np.ndarray | None = None) -> list[dict]:
    """One parabola per budget in (ln N, target); its vertex is the budget's optimum.

    Repeated runs of one (budget, size) are averaged; D_opt = C / (k·N_opt); `se` (per run) only
    annotates the profile (the fits are unweighted, as in the paper)."""
    sign = -1.0 if maximize else 1.0
    use_log = cfg.log_target and bool((target > 0).all())
    C_all, N_all, y_all = _cells(runs.flops, runs.params, target)
    se_all = None
    if se is not None and np.isfinite(se).all():
        _, _, var = _cells(runs.flops, runs.params, se ** 2)
        cnt = np.unique(np.stack([runs.flops, runs.params], 1), axis=0, return_counts=True)[1]
        se_all = np.sqrt(var / cnt)  # SE of a mean of cnt runs: sqrt(mean(se^2) / cnt)
    k = cfg.flops_per_param_sample
    out = []
    for C in np.unique(C_all):
        m = C_all == C
        order = np.argsort(N_all[m])
        N, y = N_all[m][order], y_all[m][order]
        t = np.log(y) if use_log else y
        best = int(np.argmin(sign * t))
        lo, hi = (0, len(N)) if cfg.window <= 0 else (max(0, best - cfg.window), min(len(N), best + cfg.window + 1))
        prof = {"flops": float(C), "n_sizes": int(len(N)), "params": N.tolist(), "value": y.tolist(),
                "se": None if se_all is None else se_all[m][order].tolist(),
                "window": [float(N[lo]), float(N[hi - 1])], "window_idx": [int(lo), int(hi)],
                "log_target": use_log, "coef": None,
                "kept": False, "reason": "", "n_opt": None, "d_opt": None, "y_opt": None,
                "best_n": float(N[best]),
                "best_edge": "smallest" if best == 0 else "largest" if best == len(N) - 1 else None}
        out.append(prof)
        if hi - lo < cfg.min_points:
            prof["reason"] = f"{hi - lo} model sizes in window (< {cfg.min_points})"
            continue
        if cfg.optimum == "argmin":
            if best in (0, len(N) - 1):
                prof["reason"] = f"observed optimum at the {prof['best_edge']} sampled size"
                continue
            n_opt, y_opt = N[best], y[best]
        else:
            x = np.log(N[lo:hi])
            coef = np.polyfit(x, t[lo:hi], 2)
            prof["coef"] = coef.tolist()
            if sign * coef[0] <= 0:
                prof["reason"] = "parabola opens the wrong way"
                continue
            v = -coef[1] / (2 * coef[0])
            if not x.min() <= v <= x.max():
                prof["reason"] = f"vertex {'below' if v < x.min() else 'above'} the fitted sizes"
                continue
            n_opt = float(np.exp(v))
            yv = np.polyval(coef, v)
            y_opt = float(np.exp(yv) if use_log else yv)
        prof.update(kept=True, n_opt=float(n_opt), d_opt=float(C / (k * n_opt)), y_opt=float(y_opt))
    return out


def fit_power_law(C: np.ndarray, Y: np.ndarray, level: float, w: np.ndarray | None = None) -> dict:
    """OLS (or WLS with weights ``w``) of ln Y on ln C: Y = exp(intercept)·C^exponent."""
    X = np.stack([np.ones_like(C), np.log(C)], 1)
    beta, cov, dof = ols(X, np.log(Y), w)
    return {"intercept": estimate(beta[0], np.sqrt(cov[0, 0]), level, dof),
            "exponent": estimate(beta[1], np.sqrt(cov[1, 1]), level, dof),
            "cov": cov.tolist(), "n": int(len(C))}


def fit_power_plus_const(C: np.ndarray, Y: np.ndarray, level: float) -> dict:
    """Y = E + A·C^-k fitted in log space (least squares on ln Y); falls back to E = 0."""
    lc0 = float(np.mean(np.log(C)))
    u = np.log(C) - lc0

    def f(u, E, a, k):
        return np.log(E + np.exp(a - k * u))

    ly = np.log(Y)
    best = None
    for frac in (0.0, 0.5, 0.8, 0.95):
        E0 = frac * Y.min()
        p1 = np.polyfit(u, np.log(np.maximum(Y - E0, 1e-12 * Y.max())), 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optimize.OptimizeWarning)
                p, cov = optimize.curve_fit(f, u, ly, p0=[E0, p1[1], max(-p1[0], 1e-3)],
                                            bounds=([0, -50, 0], [np.inf, 50, 20]), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(((f(u, *p) - ly) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, p, cov)
    dof = len(C) - 3
    if best is None or dof < 1 or not np.isfinite(best[2]).all():
        X = np.stack([np.ones_like(u), u], 1)
        beta, cov2, dof = ols(X, ly)
        p = np.array([0.0, beta[0], -beta[1]])
        cov = np.zeros((3, 3))
        cov[1:, 1:] = cov2 * np.array([[1, -1], [-1, 1]])
        form = "power law (E fixed to 0)"
    else:
        _, p, cov = best
        form = "E + A*C^-k"
    E, a, k = p
    logA, logA_se = delta_method(lambda th: th[1] + th[2] * lc0, p, cov)
    return {"form": form, "E": estimate(E, np.sqrt(cov[0, 0]), level, dof),
            "log_A": estimate(logA, logA_se, level, dof), "k": estimate(k, np.sqrt(cov[2, 2]), level, dof),
            "theta": p.tolist(), "cov": cov.tolist(), "log_c0": lc0, "n": int(len(C)),
            "rmse_log": float(np.sqrt(np.mean((f(u, *p) - ly) ** 2)))}


def power_plus_const(fit: dict, C) -> np.ndarray:
    E, a, k = fit["theta"]
    return E + np.exp(a - k * (np.log(np.asarray(C, float)) - fit["log_c0"]))


def _window(p: dict):
    """A kept profile's parabola data in fit space: centred ln N, target, its SE (or None), and the centre."""
    lo, hi = p["window_idx"]
    N, y = np.array(p["params"][lo:hi]), np.array(p["value"][lo:hi])
    se = None if p["se"] is None else np.array(p["se"][lo:hi])
    if p["log_target"]:
        t, se = np.log(y), (None if se is None else se / y)
    else:
        t = y
    x = np.log(N)
    return x - x.mean(), t, se, float(x.mean())


def profile_noise(profiles: list[dict], vertex: bool) -> dict:
    """Noise of the per-budget optima, in fit space (ln target where positive).

    ``sigma_run``: the scatter about parabolas over the kept windows that the runs' SEs do not explain
    (seeds, training noise, misfit), pooled over budgets. With vertex optima each kept profile gets
    ``n_opt_se`` (SE of ln N_opt) and ``y_opt_se`` (SE of ln target at the vertex) by the delta
    method from SE² + sigma_run²; observed (argmin) optima have none."""
    kept = [p for p in profiles if p["kept"]]
    ssr = meas = 0.0
    dof = 0
    fits = []
    for p in kept:
        x, t, se, _ = _window(p)
        if len(t) < 3:
            continue
        X = np.stack([x * x, x, np.ones_like(x)], 1)
        c, *_ = np.linalg.lstsq(X, t, rcond=None)
        r = t - X @ c
        h = _leverage(X)
        ssr += float(r @ r)
        meas += 0.0 if se is None else float(np.sum((1 - h) * se ** 2))
        dof += len(t) - 3
        fits.append((p, X, c, se))
    sigma2 = max(0.0, (ssr - meas) / dof) if dof > 0 else 0.0
    for p in kept:
        p["n_opt_se"] = p["y_opt_se"] = None
    for p, X, c, se in fits if vertex else ():
        var = np.full(len(X), sigma2) + (0.0 if se is None else se ** 2)
        XtXi = np.linalg.pinv(X.T @ X)
        cov = XtXi @ (X.T * var) @ X @ XtXi
        c2, c1, _ = c
        gv = np.array([c1 / (2 * c2 ** 2), -1 / (2 * c2), 0.0])
        gy = np.array([c1 ** 2 / (4 * c2 ** 2), -c1 / (2 * c2), 1.0])
        se_t = float(np.sqrt(max(gy @ cov @ gy, 0.0)))
        p["n_opt_se"] = float(np.sqrt(max(gv @ cov @ gv, 0.0)))
        p["y_opt_se"] = se_t if p["log_target"] else se_t / abs(p["y_opt"])  # SE of ln y_opt
    return {"sigma_run": float(np.sqrt(sigma2))}


def excess_scatter(resid: np.ndarray, se: np.ndarray, n_par: int) -> float:
    """tau²: the variance of the optima about their fitted law beyond their own SEs (a moment estimate)."""
    dof = len(resid) - n_par
    if dof <= 0 or not np.isfinite(se).all():
        return 0.0
    return max(0.0, float(resid @ resid) / dof - float(np.mean(se ** 2)))


def _grid_hint(profiles: list[dict], cfg: FitConfig) -> str:
    """What to try when too few budgets give an optimum: sizes past the grid's edge where the best
    observed size sits at that edge at most budgets, else other fit settings or more budgets."""
    edges = [p["best_edge"] for p in profiles if p["n_sizes"] >= cfg.min_points]
    for edge, more in (("smallest", "smaller"), ("largest", "larger")):
        n = edges.count(edge)
        if 2 * n > len(edges):
            return f"the best observed size is the {edge} sampled at {n} of {len(edges)} budgets: add {more} sizes"
    return "try --window 0, --optimum argmin or more budgets"


def fit_isoflop(runs: Runs, target: np.ndarray, cfg: FitConfig, maximize: bool = False,
                se: np.ndarray | None = None) -> dict:
    profiles = isoflop_profiles(runs, target, cfg, maximize, se)
    kept = [p for p in profiles if p["kept"]]
    if len(kept) < 3:
        enough = sum(p["n_sizes"] >= cfg.min_points for p in profiles)
        if enough < 3:
            hint = ("; runs that are not on an isoFLOP grid can share budgets with --bin-budgets"
                    if enough < len(profiles) else "")
            raise DataError(f"only {enough} of {len(profiles)} FLOP budgets have >= {cfg.min_points} model sizes "
                            f"(need 3 such budgets){hint}")
        raise DataError(f"only {len(kept)} FLOP budgets give an optimum (need >= 3); {_grid_hint(profiles, cfg)}")
    vertex = cfg.optimum == "vertex"
    noise = profile_noise(profiles, vertex)
    C = np.array([p["flops"] for p in kept])
    N = np.array([p["n_opt"] for p in kept])
    D = np.array([p["d_opt"] for p in kept])
    Y = np.array([p["y_opt"] for p in kept])
    X = np.stack([np.ones_like(C), np.log(C)], 1)
    # observed optima have no SE: all their scatter about the line counts as budget noise (conservative)
    s_n = np.array([p["n_opt_se"] for p in kept]) if vertex else np.zeros(len(kept))
    noise["tau_n"] = float(np.sqrt(excess_scatter(np.log(N) - X @ ols(X, np.log(N))[0], s_n, 2)))
    weights, noise["weighted"], noise["weights"] = None, False, "none: ordinary least squares, as the paper"
    if cfg.vertex_weights == "se":
        if not vertex:
            noise["weights"] = "none: observed (argmin) optima have no SE to weight by"
        else:
            weights = 1.0 / (s_n ** 2 + noise["tau_n"] ** 2)
            noise["weighted"] = True
            noise["weights"] = "1 / (SE² + tau²) per optimum (random effects), Knapp-Hartung covariance"
    n_fit, d_fit = fit_power_law(C, N, cfg.ci_level, weights), fit_power_law(C, D, cfg.ci_level, weights)
    if (Y > 0).all():
        y_fit = fit_power_plus_const(C, 1.0 / Y if maximize else Y, cfg.ci_level)
        y_fit["inverse"] = maximize
        if len(kept) > 3:
            ly = np.log(1.0 / Y if maximize else Y)
            s_y = np.array([p["y_opt_se"] for p in kept]) if vertex else np.zeros(len(kept))
            noise["tau_y"] = float(np.sqrt(excess_scatter(ly - np.log(power_plus_const(y_fit, C)), s_y, 3)))
    else:
        y_fit = None  # E + A·C^-k needs positive optima
    return {"profiles": profiles, "budgets_kept": C.tolist(), "noise": noise,
            "N_opt": n_fit, "D_opt": d_fit, "Y_opt": y_fit,
            "a": n_fit["exponent"], "b": d_fit["exponent"],
            "allocation": {"log_gn": n_fit["intercept"]["value"], "a": n_fit["exponent"]["value"],
                           "log_gd": d_fit["intercept"]["value"], "b": d_fit["exponent"]["value"]}}


def near_optimum(runs: Runs, target: np.ndarray, profiles: list[dict], cfg: FitConfig):
    """The runs the parametric fits see: those inside a kept budget's parabola window (or all)."""
    if cfg.parametric_points == "all":
        return runs, target
    m = np.zeros(len(runs), bool)
    for p in profiles:
        if p["kept"]:
            lo, hi = p["window"]
            m |= (runs.flops == p["flops"]) & (runs.params >= lo) & (runs.params <= hi)
    return runs.subset(m), target[m]


# ---------------------------------------------------------------- parametric: quadratic in (ln N, ln D)

def one_budget(runs: Runs, what: str) -> None:
    """Refuse a parametric fit whose runs span (nearly) one FLOP budget: there N and D move together."""
    span = float(runs.flops.max() / runs.flops.min())
    if span < 1.5:
        raise DataError(f"{what} needs runs at more than one FLOP budget (these span {span:.3g}x in C): "
                        "at one budget N and D move together, so their exponents cannot be told apart")


def fit_quadratic(runs: Runs, target: np.ndarray, cfg: FitConfig, maximize: bool = False,
                  se: np.ndarray | None = None) -> dict:
    """ln target = b0 + b1 x + b2 y + b3 x² + b4 xy + b5 y² by OLS over the given runs (the paper's Eq. 3).

    ``se`` (per run) only sets ``sigma_run``, the scatter the SEs do not explain (for the bootstrap)."""
    if (target <= 0).any():
        raise DataError("quadratic parametric fit needs positive targets")
    x, y, t = np.log(runs.params), np.log(runs.samples), np.log(target)
    X = quad_design(x, y)
    if len(t) < 7:
        raise DataError(f"quadratic parametric fit needs >= 7 runs, got {len(t)}")
    one_budget(runs, "the quadratic parametric fit")
    if np.linalg.matrix_rank(X) < 6:
        raise DataError("quadratic parametric fit: the runs do not vary ln N and ln D independently enough")
    beta, cov, dof = ols(X, t)
    k, lvl = cfg.flops_per_param_sample, cfg.ci_level
    a_val, a_se = delta_method(lambda b: quad_alloc(b, k)[1], beta, cov)
    g_val, g_se = delta_method(lambda b: quad_alloc(b, k)[0], beta, cov)
    curv = 2 * (beta[3] - beta[4] + beta[5])
    ok = curv < 0 if maximize else curv > 0
    names = ["b0", "b_lnN", "b_lnD", "b_lnN2", "b_lnNlnD", "b_lnD2"]
    resid = t - quad_design(x, y) @ beta
    Xc = quad_design(x - x.mean(), y - y.mean())
    se_t = None if se is None or not np.isfinite(se).all() else se / target
    sigma = np.sqrt(excess_variance(resid, se_t, 1 - _leverage(Xc), dof))
    return {"form": "ln Y = b0 + b1 lnN + b2 lnD + b3 lnN^2 + b4 lnN lnD + b5 lnD^2", "sigma_run": float(sigma),
            "coef": {n: estimate(v, np.sqrt(max(cov[i, i], 0.0)), lvl, dof) for i, (n, v) in enumerate(zip(names, beta))},
            "beta": beta.tolist(), "cov": cov.tolist(),
            "a": estimate(a_val, a_se, lvl, dof), "b": estimate(1 - a_val, a_se, lvl, dof),
            "optimum_exists": bool(ok), "rmse_log": float(np.sqrt(np.mean(resid ** 2))), "n": int(len(t)),
            "allocation": {"log_gn": g_val, "a": a_val, "log_gd": -np.log(k) - g_val, "b": 1 - a_val}}


def quadratic_predict(fit: dict, N, D) -> np.ndarray:
    x, y = np.log(np.asarray(N, float)), np.log(np.asarray(D, float))
    return np.exp(quad_design(np.atleast_1d(x), np.atleast_1d(y)) @ np.array(fit["beta"]))


# ---------------------------------------------------------------- parametric: Chinchilla

def _chin_terms(theta, x, y):
    e, a, b, alpha, beta = theta
    return np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)], -1)


def _huber(r, d):
    ar = np.abs(r)
    return np.where(ar <= d, 0.5 * r * r, d * (ar - 0.5 * d))


def _chin_obj(theta, x, y, t, d):
    e, a, b, alpha, beta = theta
    z1, z2 = a - alpha * x, b - beta * y
    m = np.maximum(np.maximum(z1, z2), e)
    w1, w2, w3 = np.exp(z1 - m), np.exp(z2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - t
    ar = np.abs(r)
    obj = np.where(ar <= d, 0.5 * r * r, d * (ar - 0.5 * d)).sum()
    psi = np.clip(r, -d, d) / s
    p1, p2 = psi * w1, psi * w2
    return float(obj), np.array([(psi * w3).sum(), p1.sum(), p2.sum(), -(p1 @ x), -(p2 @ y)])


def chinchilla_grid():
    g = np.meshgrid(np.linspace(-1, 1, 5), np.arange(0, 30, 5.0), np.arange(0, 30, 5.0),
                    np.linspace(0, 2, 5), np.linspace(0, 2, 5), indexing="ij")
    return np.stack([a.ravel() for a in g], 1)


def fit_chinchilla(runs: Runs, target: np.ndarray, cfg: FitConfig, se: np.ndarray | None = None) -> dict:
    """L = E + A/N^alpha + B/D^beta: Huber loss on ln L, L-BFGS-B from the best grid starts."""
    if (target <= 0).any():
        raise DataError("Chinchilla fit needs positive targets")
    x, y, t = np.log(runs.params), np.log(runs.samples), np.log(target)
    if len(t) < 6 or len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
        raise DataError(f"Chinchilla fit needs >= 6 runs with >= 2 sizes and >= 2 sample counts, got {len(t)} runs")
    one_budget(runs, "the Chinchilla fit")
    grid = chinchilla_grid()
    z1 = grid[:, 1, None] - grid[:, 3, None] * x
    z2 = grid[:, 2, None] - grid[:, 4, None] * y
    z3 = grid[:, 0, None]
    m = np.maximum(np.maximum(z1, z2), z3)
    r = m + np.log(np.exp(z1 - m) + np.exp(z2 - m) + np.exp(z3 - m)) - t
    objs = _huber(r, cfg.huber_delta).sum(1)
    best = None
    for i in np.argsort(objs)[: cfg.grid_top_k]:
        r = optimize.minimize(_chin_obj, grid[i], args=(x, y, t, cfg.huber_delta), jac=True,
                              method="L-BFGS-B",
                              options={"ftol": cfg.ftol, "gtol": cfg.gtol, "maxiter": cfg.maxiter})
        if best is None or r.fun < best.fun:
            best = r
    theta = best.x
    z = _chin_terms(theta, x, y)
    w = softmax(z, axis=-1)
    J = np.stack([w[:, 2], w[:, 0], w[:, 1], -w[:, 0] * x, -w[:, 1] * y], 1)
    resid = logsumexp(z, axis=-1) - t
    dof = len(t) - 5
    cov = (resid @ resid / dof) * np.linalg.pinv(J.T @ J)  # Gauss-Newton at the Huber optimum
    k, lvl = cfg.flops_per_param_sample, cfg.ci_level
    ok = bool(theta[3] > 0 and theta[4] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a_val, a_se = delta_method(lambda th: chin_alloc(th, k)[1], theta, cov)
        g_val = chin_alloc(theta, k)[0] if ok else float("nan")
    names = ["log_E", "log_A", "log_B", "alpha", "beta"]
    se_t = None if se is None or not np.isfinite(se).all() else se / target
    sigma = np.sqrt(excess_variance(resid, se_t, max(dof, 0) / len(t), dof))
    return {"form": "L = E + A/N^alpha + B/D^beta", "theta": theta.tolist(), "cov": cov.tolist(),
            "sigma_run": float(sigma),
            "coef": {n: estimate(v, np.sqrt(max(cov[i, i], 0.0)), lvl, dof) for i, (n, v) in enumerate(zip(names, theta))},
            "E": float(np.exp(theta[0])), "A": float(np.exp(theta[1])), "B": float(np.exp(theta[2])),
            "a": estimate(a_val, a_se, lvl, dof), "b": estimate(1 - a_val, a_se, lvl, dof),
            "objective": float(best.fun), "converged": bool(best.success), "optimum_exists": ok,
            "rmse_log": float(np.sqrt(np.mean(resid ** 2))), "n": int(len(t)),
            "allocation": {"log_gn": g_val, "a": a_val, "log_gd": -np.log(k) - g_val, "b": 1 - a_val}}


def chinchilla_predict(fit: dict, N, D) -> np.ndarray:
    e, a, b, al, be = fit["theta"]
    N, D = np.asarray(N, float), np.asarray(D, float)
    return np.exp(e) + np.exp(a) / N ** al + np.exp(b) / D ** be


# ---------------------------------------------------------------- return vs loss

def fit_return_vs_loss(runs: Runs, cfg: FitConfig) -> dict:
    """R = c·L^delta over each budget's loss-optimal size (OLS in log space)."""
    C, N, L = _cells(runs.flops, runs.params, runs.loss)
    _, _, R = _cells(runs.flops, runs.params, runs.ret)
    pick = [np.flatnonzero(C == c)[np.argmin(L[C == c])] for c in np.unique(C)]
    Lb, Rb, Cb = L[pick], R[pick], C[pick]
    ok = Rb > 0
    if ok.sum() < 3:
        raise DataError("fewer than 3 budgets with positive return at the loss optimum")
    fit = fit_power_law(Lb[ok], Rb[ok], cfg.ci_level)
    return {"form": "R = exp(log_c)*L^delta", "log_c": fit["intercept"], "delta": fit["exponent"],
            "points": {"flops": Cb[ok].tolist(), "loss": Lb[ok].tolist(), "return": Rb[ok].tolist()}}


# ---------------------------------------------------------------- rolling cross-validation

def allocation_n(alloc: dict, C) -> np.ndarray:
    return np.exp(alloc["log_gn"]) * np.asarray(C, float) ** alloc["a"]


def predict_optimum(method: str, fit: dict, C, k: float) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, target at the optimum) of one fitted method at budgets C."""
    C = np.atleast_1d(np.asarray(C, float))
    N = allocation_n(fit["allocation"], C)
    D = C / (k * N)
    if method == "isoflop":
        if fit["Y_opt"] is None:
            return N, np.full_like(C, np.nan)
        Y = power_plus_const(fit["Y_opt"], C)
        return N, (1.0 / Y if fit["Y_opt"].get("inverse") else Y)
    if method == "quadratic":
        return N, quadratic_predict(fit, N, D)
    return N, chinchilla_predict(fit, N, D)


def rolling_cv(runs: Runs, target: np.ndarray, profiles: list[dict], cfg: FitConfig,
               methods: tuple[str, ...], maximize: bool = False) -> dict:
    """Hold out each of the largest kept budgets in turn, fit on all smaller budgets, predict its optimum."""
    kept = [p for p in profiles if p["kept"]]
    folds = kept[-cfg.cv_folds:] if cfg.cv_folds > 0 else []
    errs = {m: {"log10_n_opt": [], "rel_y_opt": []} for m in methods}
    rows = []
    for p in folds:
        m = runs.flops < p["flops"]
        train, t = runs.subset(m), target[m]
        if sum(q["kept"] and q["flops"] < p["flops"] for q in kept) < 3:
            continue
        row = {"held_out": p["flops"], "n_opt": p["n_opt"], "y_opt": p["y_opt"]}
        try:
            iso = fit_isoflop(train, t, cfg, maximize)
        except DataError:
            continue
        ptrain, pt = near_optimum(train, t, iso["profiles"], cfg)
        for meth in methods:
            try:
                if meth == "isoflop":
                    f = iso
                elif meth == "quadratic":
                    f = fit_quadratic(ptrain, pt, cfg, maximize)
                else:
                    f = fit_chinchilla(ptrain, pt, cfg)
            except (DataError, np.linalg.LinAlgError, ValueError):
                continue
            N, Y = predict_optimum(meth, f, p["flops"], cfg.flops_per_param_sample)
            row[meth] = {"n_opt": float(N[0]), "y_opt": float(Y[0])}
            errs[meth]["log10_n_opt"].append(np.log10(N[0] / p["n_opt"]))
            errs[meth]["rel_y_opt"].append(Y[0] / p["y_opt"] - 1)
        rows.append(row)
    rmse = {m: {k: (float(np.sqrt(np.mean(np.square(v)))) if v else None) for k, v in e.items()}
            for m, e in errs.items()}
    scored = [m for m in methods if rmse[m]["rel_y_opt"] is not None]
    best = min(scored, key=lambda m: rmse[m]["rel_y_opt"]) if scored else None
    return {"folds": rows, "rmse": rmse, "best_by_y_opt": best}


# ---------------------------------------------------------------- everything

def fit_all(runs: Runs, cfg: FitConfig | None = None, progress: bool = False) -> dict:
    """Every fit on one runs table, as one JSON-able dict."""
    # threaded BLAS inside L-BFGS-B's tiny 5-parameter updates costs ~30x on a busy machine
    with threadpool_limits(1):
        return _fit_all(runs, cfg or FitConfig(), progress)


FIT_ERRORS = (DataError, np.linalg.LinAlgError, ValueError)


def parametric_methods(cfg: FitConfig, maximize: bool) -> tuple[str, ...]:
    return tuple(m for m in PARAMETRIC[maximize] if cfg.chinchilla or m != "chinchilla")


def fit_target(runs: Runs, target: np.ndarray, cfg: FitConfig, maximize: bool = False,
               se: np.ndarray | None = None, crossval: bool = True) -> dict:
    """isoFLOP where the budgets allow it, then the parametric fits over all points (or the kept windows).

    `methods` maps each method to {"ran", "reason"}: what it ran on, or why it did not run."""
    res: dict = {"runs": {"flops": runs.flops.tolist(), "params": runs.params.tolist(),
                          "samples": runs.samples.tolist(), "value": target.tolist()}}
    methods = {}
    try:
        iso = fit_isoflop(runs, target, cfg, maximize, se)
    except DataError as e:
        iso = None
        methods["isoflop"] = {"ran": False, "reason": str(e)}
        shaped = [p for p in isoflop_profiles(runs, target, cfg, maximize, se) if p["n_sizes"] >= cfg.min_points]
        if shaped:  # budgets with enough sizes for a parabola: drawn, each with why it gives no optimum
            res["isoflop_profiles"] = shaped
    else:
        res["isoflop"] = iso
        methods["isoflop"] = {"ran": True, "reason": f"{len(iso['budgets_kept'])} of {len(iso['profiles'])} "
                                                      "FLOP budgets give an optimum"}
    if cfg.parametric_points == "all":
        pr, pt, on = runs, target, "all runs"
    elif iso is None:
        pr, pt, on = runs, target, "all runs: the isoFLOP method did not run"
    else:
        (pr, pt), on = near_optimum(runs, target, iso["profiles"], cfg), "inside the kept isoFLOP windows"
    pse = None
    if se is not None:
        pse = se if pr is runs else near_optimum(runs, se, iso["profiles"], cfg)[1]
    for meth in parametric_methods(cfg, maximize):
        try:
            f = (fit_quadratic(pr, pt, cfg, maximize, pse) if meth == "quadratic"
                 else fit_chinchilla(pr, pt, cfg, pse))
        except FIT_ERRORS as e:
            methods[meth] = {"ran": False, "reason": str(e)}
            continue
        res[meth] = f
        note = "" if f["optimum_exists"] else "; it has no compute-optimal allocation to forecast with"
        methods[meth] = {"ran": True, "reason": f"on {f['n']} runs ({on}){note}"}
    res["methods"] = methods
    if crossval:
        if iso is None:
            res["crossval"] = {"folds": [], "rmse": {}, "best_by_y_opt": None,
                               "skipped": "needs isoFLOP optima to hold out; the isoFLOP method did not run"}
        else:
            ran = tuple(m for m in ("isoflop",) + parametric_methods(cfg, maximize) if m in res)
            res["crossval"] = rolling_cv(runs, target, iso["profiles"], cfg, ran, maximize)
    return res


def _fit_all(runs: Runs, cfg: FitConfig, progress: bool) -> dict:
    if len(runs) < 8:
        raise DataError(f"only {len(runs)} runs; need at least 8")
    ratio = runs.flops / (runs.params * runs.samples)
    out = {"config": asdict(cfg), "source": runs.source, "n_runs": int(len(runs)),
           "dropped_non_finite": {"n": int(runs.n_dropped), "of": int(len(runs) + runs.n_dropped),
                                  "by_column": dict(runs.dropped)},
           "dropped_duplicates": int(runs.n_duplicates),
           "median_flops_per_param_sample": float(np.median(ratio))}
    raw = runs
    if cfg.bin_budgets > 0:
        before = len(runs.budgets)
        runs = bin_budgets(runs, cfg.bin_budgets)
        out["binning"] = {"bins_per_decade": cfg.bin_budgets, "budgets_before": int(before),
                          "budgets_after": int(len(runs.budgets))}
    out["budgets"] = runs.budgets.tolist()
    # Fit steps: the loss fits, the return fits, return vs loss (the bootstrap has its own bar).
    bar = tqdm(total=3, desc="fit loss", unit="fit", disable=not progress, leave=False)
    try:
        out = _fit_steps(runs, cfg, progress, out, bar)
    finally:
        bar.close()
    out["forecasts"] = default_forecasts(out, 10 * float(runs.flops.max()))
    if cfg.sensitivity:
        from trajdata.scaling.sensitivity import sensitivity

        # the forecast a decade of compute past the largest budget, under each setting
        out["sensitivity"] = sensitivity(raw, cfg, fit_all, fit=out, progress=progress, compute=10 * float(runs.flops.max()))
    return out


def default_forecasts(fit: dict, compute: float) -> dict:
    """Every method's forecast (with intervals) at ``compute``, and the method each target prefers."""
    from trajdata.scaling.forecast import forecast, preferred

    try:
        rows = forecast(fit, compute=compute)
    except DataError:
        rows = []
    return {"given": {"compute": compute}, "rows": rows,
            "preferred": {t: dict(zip(("method", "why"), preferred(fit, t))) for t in ("loss", "return") if t in fit}}


def _fit_steps(runs: Runs, cfg: FitConfig, progress: bool, out: dict, bar) -> dict:
    if runs.has_loss:
        out["loss"] = fit_target(runs, runs.loss, cfg, se=runs.loss_se)
        if not any(st["ran"] for st in out["loss"]["methods"].values()):
            raise DataError("no loss fit could run: " + "; ".join(
                f"{m}: {st['reason']}" for m, st in out["loss"]["methods"].items()))
    else:
        out["loss_skipped"] = "the runs table has returns only (RL runs are fitted on the return)"
    bar.update()
    bar.set_description("fit return")
    if not cfg.fit_return:
        out["return_skipped"] = "return fits were turned off (--no-return)"
    elif runs.ret is None:
        out["return_skipped"] = "the runs table has no return column"
    elif np.isfinite(runs.ret).sum() < 8:
        out["return_skipped"] = f"only {int(np.isfinite(runs.ret).sum())} runs have a finite return (need 8)"
    else:
        rr = runs.subset(np.isfinite(runs.ret))
        out["n_runs_with_return"] = int(len(rr))
        out["return"] = fit_target(rr, rr.ret, cfg, maximize=True, se=rr.ret_se)
        bar.update()
        bar.set_description("fit return vs loss")
        if runs.has_loss:
            try:
                out["return_vs_loss"] = fit_return_vs_loss(rr, cfg)
            except DataError:
                pass
    if "loss" not in out:
        if "return" not in out:
            raise DataError(f"nothing to fit: the runs table has no loss, and {out['return_skipped']}")
        if not any(st["ran"] for st in out["return"]["methods"].values()):
            raise DataError("no return fit could run: " + "; ".join(
                f"{m}: {st['reason']}" for m, st in out["return"]["methods"].items()))
    bar.update(bar.total - bar.n)
    if cfg.bootstrap > 0:
        out["bootstrap"], out["bootstrap_draws"] = bootstrap(runs, out, cfg, progress)
    headline_intervals(out, cfg)
    out["summary"] = summary(out)
    return out


def summary(fit: dict) -> dict:
    """The headline exponents: {"loss.isoflop.a": estimate, ...}."""
    s = {}
    for tgt in ("loss", "return"):
        for meth in ("isoflop", "quadratic", "chinchilla"):
            f = fit.get(tgt, {}).get(meth)
            if f:
                s[f"{tgt}.{meth}.a"] = f["a"]
                s[f"{tgt}.{meth}.b"] = f["b"]
    if "return_vs_loss" in fit:
        s["return_vs_loss.delta"] = fit["return_vs_loss"]["delta"]
        s["return_vs_loss.delta"].setdefault("ci_method", "OLS t-interval over the budgets' loss optima")
    if fit.get("loss", {}).get("isoflop", {}).get("Y_opt"):
        e = s["loss.isoflop.k"] = fit["loss"]["isoflop"]["Y_opt"]["k"]
        b = (fit.get("bootstrap") or {}).get("loss.isoflop.k")
        e.setdefault("ci_analytic", list(e["ci"]))
        if b and b["n"] >= BOOTSTRAP_MIN_SHARE * fit["config"]["bootstrap"] and all(np.isfinite(b["ci"])):
            e.update(ci=b["ci"], ci_bootstrap=b["ci"], ci_method=f"bootstrap percentile, {b['n']} draws")
        else:
            e.setdefault("ci_method", "delta method on the E + A·C^-k fit's covariance")
    return s


ANALYTIC = {"isoflop": "OLS t-interval over the budget optima", "quadratic": "delta method on the OLS covariance",
            "chinchilla": "delta method on the Gauss-Newton covariance"}
WEIGHTED = "WLS t-interval over the budget optima (weights 1/(SE²+tau²), Knapp-Hartung)"


def headline_intervals(fit: dict, cfg: FitConfig) -> None:
    """Give every exponent its interval's provenance: ``ci`` is the headline interval (the bootstrap's
    where it ran, which the coverage test calibrates), ``ci_analytic`` the OLS/delta-method one."""
    bs = fit.get("bootstrap") or {}
    for tgt in ("loss", "return"):
        for meth in ("isoflop", "quadratic", "chinchilla"):
            f = fit.get(tgt, {}).get(meth)
            if not f:
                continue
            analytic = WEIGHTED if meth == "isoflop" and f["noise"]["weighted"] else ANALYTIC[meth]
            for name in ("a", "b"):
                e = f[name]
                e["ci_analytic"] = list(e["ci"])
                b = bs.get(f"{tgt}.{meth}.{name}")
                if b and b["n"] >= BOOTSTRAP_MIN_SHARE * cfg.bootstrap and all(np.isfinite(b["ci"])):
                    e["ci_bootstrap"] = b["ci"]
                    e["ci"] = b["ci"]
                    e["ci_method"] = f"bootstrap percentile, {b['n']} of {cfg.bootstrap} draws"
                else:
                    e["ci_method"] = analytic + ("" if not b else
                                                 f" (the bootstrap: only {b['n']} of {cfg.bootstrap} draws gave a fit)")


def bootstrap(runs: Runs, fit: dict, cfg: FitConfig, progress: bool = False) -> tuple[dict, dict]:
    """Percentile intervals of the exponents and every method's forecast parameters, per draw
    (trajdata.scaling.bootstrap)."""
    from trajdata.scaling import bootstrap as bs

    return bs.bootstrap(runs, fit, cfg, progress)
