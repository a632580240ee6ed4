"""Runs tables drawn from a known law, and the coverage of the intervals fitted to them.

The law: ln L = ln L*(C) + kappa·(ln N - ln N*(C))², with N*(C) = exp(g)·C^a and ln L*(C) linear in
ln C. Under C = k·N·D it is a quadratic in (ln N, ln D) (the paper's parametric form), and each
budget's profile is a parabola in ln N with its vertex at N*(C) (the isoFLOP method's model), so
both methods are unbiased on it and any miss of an interval is the interval's fault.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Law:
    a: float = 0.6             # N_opt ∝ C^a
    n_at_1e15: float = 1e6     # N_opt at C = 1e15
    loss_at_1e15: float = 3.0  # the optimal loss at C = 1e15 (nats)
    loss_slope: float = -0.05  # d ln L_opt / d ln C
    kappa: float = 0.05        # curvature of ln L in ln N at fixed C
    k: float = 6.0

    def n_opt(self, C):
        return self.n_at_1e15 * (np.asarray(C, float) / 1e15) ** self.a

    def loss(self, N, C):
        lc = np.log(np.asarray(C, float) / 1e15)
        return np.exp(np.log(self.loss_at_1e15) + self.loss_slope * lc
                      + self.kappa * (np.log(N) - np.log(self.n_opt(C))) ** 2)

    def n_for_dataset(self, D: float) -> float:
        """The compute-optimal N whose optimal D is ``D``: solve D = C / (k·N*(C)) for C."""
        # ln D = (1 - a) ln C - ln k - ln n0 + a ln 1e15
        lc = (np.log(D) + np.log(self.k) + np.log(self.n_at_1e15) - self.a * np.log(1e15)) / (1 - self.a)
        return float(self.n_opt(np.exp(lc)))


def runs_table(law: Law = Law(), seed: int = 0, grid: bool = True, budgets=np.logspace(15, 18, 8),
               sizes=np.logspace(5, 8.8, 10), n_random: int = 80, se_range=(0.02, 0.1),
               episodes: int = 0, episode_sd: float = 0.2) -> pd.DataFrame:
    """A runs table from ``law`` with per-point noise: each run's SE drawn uniformly from ``se_range``
    (nats) and its loss = law + SE·N(0, 1). ``grid``: every size at every budget; else ``n_random`` runs
    at log-uniform N and C over the same ranges (each its own budget).

    ``episodes`` > 0: validation on that many shared episodes instead, each with its own difficulty
    (N(0, episode_sd) nats, the same for every run) and per-run noise; the table then carries each
    run's per-episode losses (``val_episode_losses``) and the episode-clustered SE."""
    from trajdata.scaling.runs import format_episode_losses

    rng = np.random.default_rng(seed)
    if grid:
        C, N = (a.ravel() for a in np.meshgrid(budgets, sizes, indexing="ij"))
    else:
        C = 10 ** rng.uniform(np.log10(budgets[0]), np.log10(budgets[-1]), n_random)
        N = 10 ** rng.uniform(np.log10(sizes[0]), np.log10(sizes[-1]), n_random)
    truth = law.loss(N, C)
    df = pd.DataFrame({"flops": C, "params": N, "samples": C / (law.k * N)})
    if not episodes:
        se = rng.uniform(*se_range, len(C))
        return df.assign(loss=truth + se * rng.standard_normal(len(C)), loss_se=se)
    steps = rng.integers(200, 2000, episodes).astype(float)
    difficulty = episode_sd * rng.standard_normal(episodes)
    per = truth[:, None] + difficulty + episode_sd / 2 * rng.standard_normal((len(C), episodes))
    loss = per @ steps / steps.sum()
    se = np.sqrt(episodes / (episodes - 1) * (((per - loss[:, None]) * steps) ** 2).sum(1)) / steps.sum()
    cells = [format_episode_losses(range(episodes), row, steps) for row in per]
    return df.assign(loss=loss, loss_se=se, val_episode_losses=cells)


def coverage(tables: int = 200, bootstrap: int = 200, grid: bool = True, law: Law = Law(),
             dataset_size: float | None = None, seed0: int = 0, methods=("isoflop", "quadratic"),
             episodes: int = 0, drop_se: bool = False, **fit_settings) -> dict:
    """Fit ``tables`` seeded tables; per method the fraction whose intervals hold the true exponent a,
    the true forecast N (at ``dataset_size``, default: the optimal D at 10x the largest budget) and the
    true C that reaches that run's optimal loss (``forecast --reach``), for the bootstrap intervals and
    for the analytic (OLS / delta-method) ones. ``fit_settings``: FitConfig fields to change."""
    from trajdata.scaling.fits import FitConfig, fit_all
    from trajdata.scaling.forecast import intervals
    from trajdata.scaling.runs import runs_from_frame

    D = dataset_size or float(1e19 / (law.k * law.n_opt(1e19)))
    n_true = law.n_for_dataset(D)
    c_true = law.k * n_true * D  # the budget whose optimum has D, and the optimal loss there (--reach's truth)
    reach = float(law.loss(n_true, c_true))
    cfg = FitConfig(**{**dict(bootstrap=bootstrap, cv_folds=0, fit_return=False, chinchilla=False, seed=seed0),
                       **fit_settings})
    hits = {m: {k: [] for k in ("a_bootstrap", "a_analytic", "n_bootstrap", "n_analytic", "c_reach_bootstrap",
                                 "c_reach_analytic")} for m in methods}
    width = {m: [] for m in methods}
    failed = {m: 0 for m in methods}
    for i in range(tables):
        df = runs_table(law, seed0 + i, grid, episodes=episodes)
        fit = fit_all(runs_from_frame(df.drop(columns=["loss_se"]) if drop_se else df), cfg)
        bare = {k: v for k, v in fit.items() if k != "bootstrap_draws"}
        for m in methods:
            f = fit["loss"].get(m)
            if f is None or "ci_bootstrap" not in f["a"]:
                failed[m] += 1
                continue
            h = hits[m]
            h["a_bootstrap"].append(f["a"]["ci_bootstrap"][0] <= law.a <= f["a"]["ci_bootstrap"][1])
            h["a_analytic"].append(f["a"]["ci_analytic"][0] <= law.a <= f["a"]["ci_analytic"][1])
            nb = intervals(fit, "loss", m, cfg.ci_level, dataset_size=D)["params"]
            na = intervals(bare, "loss", m, cfg.ci_level, dataset_size=D)["params"]
            h["n_bootstrap"].append(nb[0] <= n_true <= nb[1])
            h["n_analytic"].append(na[0] <= n_true <= na[1])
            cb = intervals(fit, "loss", m, cfg.ci_level, reach=reach)["flops"]
            ca = intervals(bare, "loss", m, cfg.ci_level, reach=reach)["flops"]
            h["c_reach_bootstrap"].append(cb[0] <= c_true <= cb[1])
            h["c_reach_analytic"].append(ca[0] <= c_true <= ca[1])
            width[m].append(f["a"]["ci_bootstrap"][1] - f["a"]["ci_bootstrap"][0])
    return {"tables": tables, "bootstrap": bootstrap, "grid": grid, "episodes": episodes, "se_column": not drop_se,
            "true_a": law.a, "dataset_size": D,
            "true_n": n_true, "reach": reach, "true_c_reach": c_true,
            "coverage": {m: {k: (float(np.mean(v)) if v else None) for k, v in h.items()} for m, h in hits.items()},
            "fitted": {m: len(hits[m]["a_bootstrap"]) for m in methods}, "failed": failed,
            "median_a_ci_width": {m: float(np.median(w)) if w else None for m, w in width.items()}}
