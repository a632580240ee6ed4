"""The settings of every scaling fit: `FitConfig`, the flags of `scaling fit` and `scaling forecast`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trajdata.config import choose, coerce_fields, option, require

BOOTSTRAP_MIN_SHARE = 0.8  # a bootstrap sets an interval only where this share of its draws gave a fit

OPTIMA = ("vertex", "argmin")
PARAMETRIC_POINTS = ("window", "all")
VERTEX_WEIGHTS = ("none", "se")


@dataclass
class FitConfig:
    """All fitting hyper-parameters (the flags of `scaling fit` and `scaling forecast`)."""

    optimum: str = option("vertex", "Per-budget optimum: parabola vertex or best observed run (argmin).",
                          choices=OPTIMA)
    window: int = option(3, "Sizes either side of the observed optimum each parabola uses (0: all).")
    min_points: int = option(3, "Model sizes (in the window) a budget needs to be kept.", flag="min_points_per_budget")
    log_target: bool = option(True, "Fit each parabola in (ln N, ln target), as the seed code does.")
    flops_per_param_sample: float = option(6.0, "k in C = k*N*D (6 for Transformers).")
    ci_level: float = option(0.95, "CI level.", flag="ci")
    huber_delta: float = option(1e-3, "Huber loss delta of the Chinchilla fit.")
    ftol: float = option(1e-15, "L-BFGS-B ftol of the Chinchilla fit.")
    gtol: float = option(1e-12, "L-BFGS-B gtol of the Chinchilla fit.")
    maxiter: int = option(20_000, "L-BFGS-B iterations of the Chinchilla fit.")
    grid_top_k: int = option(16, "Chinchilla: best grid starts refined by L-BFGS-B.")
    cv_folds: int = option(4, "Rolling cross-validation: largest budgets held out one at a time.")
    bootstrap: int = option(1000, "Bootstrap draws behind every interval (0: OLS/delta-method intervals only).")
    seed: int = option(0, "Bootstrap seed.")
    fit_return: bool = option(True, "Fit the return too (--no-return: loss only).", flag="return")
    parametric_points: str = option("window", "Runs the parametric fits use: inside kept parabola windows, or all.",
                                    choices=PARAMETRIC_POINTS)
    bin_budgets: float = option(0.0, "Bin FLOP budgets, this many bins per decade; each run's FLOPs snap to its bin's "
                                     "geometric centre, so runs off an isoFLOP grid can share budgets (0: off).",
                                metavar="PER_DECADE")
    vertex_weights: str = option("none", "isoFLOP power laws over the budget optima: unweighted (as the paper), or "
                                         "weighted 1/(SE²+tau²) by each optimum's SE.", choices=VERTEX_WEIGHTS)
    chinchilla: bool = option(True, "Fit Chinchilla's form to the loss (the slowest fit).")
    sensitivity: bool = option(False, "Also refit under each alternative setting (window, optimum, budgets, points, "
                                      "weights) and show the forecasts side by side.")

    def __post_init__(self):
        coerce_fields(self)
        choose(self.optimum, OPTIMA, "optimum")
        require(self.min_points >= 3 or self.optimum != "vertex", "min_points", "must be >= 3 to fit a parabola")
        choose(self.parametric_points, PARAMETRIC_POINTS, "parametric_points")
        choose(self.vertex_weights, VERTEX_WEIGHTS, "vertex_weights")
        require(0 < self.ci_level < 1, "ci_level", f"must be in (0, 1) (got {self.ci_level})")
        require(bool(np.isfinite(self.bin_budgets) and self.bin_budgets >= 0), "bin_budgets",
                f"must be >= 0 bins per decade (0: off), not {self.bin_budgets}")
        require(bool(np.isfinite(self.flops_per_param_sample) and self.flops_per_param_sample > 0),
                "flops_per_param_sample", f"must be a positive number, not {self.flops_per_param_sample}")
        require(self.bootstrap >= 0, "bootstrap", f"must be >= 0 draws (0: analytic intervals only), not {self.bootstrap}")
        require(self.cv_folds >= 0, "cv_folds", f"must be >= 0, not {self.cv_folds}")
