"""Compute-optimal forecasts from a fit: given D, C or N, the other two and the predicted loss/return."""
from __future__ import annotations

import numpy as np

from trajdata.errors import ConfigError, DataError
from trajdata.scaling.fits import chinchilla_predict, power_plus_const, quadratic_predict

METHODS = ("isoflop", "quadratic", "chinchilla")


def solve_compute(alloc: dict, *, dataset_size=None, compute=None, params=None) -> float:
    """The budget C whose optimal allocation has the given D (or N), or C itself."""
    given = [v is not None for v in (dataset_size, compute, params)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --dataset-size, --compute, --params")
    for name, v in (("dataset size", dataset_size), ("compute", compute), ("params", params)):
        if v is not None and not v > 0:
            raise ConfigError(f"{name} must be positive, not {v}")
    if compute is not None:
        return float(compute)
    if dataset_size is not None:
        return float(np.exp((np.log(dataset_size) - alloc["log_gd"]) / alloc["b"]))
    return float(np.exp((np.log(params) - alloc["log_gn"]) / alloc["a"]))


def forecast_one(fit: dict, target: str, method: str, **given) -> dict:
    """One method's forecast for 'loss' (minimised) or 'return' (maximised)."""
    f = fit.get(target, {}).get(method)
    if f is None:
        raise DataError(f"fit has no {target} {method} result")
    alloc = f["allocation"]
    if any(v is None or not np.isfinite(v) for v in alloc.values()):
        raise DataError(f"the {target} {method} fit has no optimum to forecast with")
    C = solve_compute(alloc, **given)
    N = float(np.exp(alloc["log_gn"]) * C ** alloc["a"])
    D = float(np.exp(alloc["log_gd"]) * C ** alloc["b"])
    if method == "isoflop":
        if f["Y_opt"] is None:
            y = float("nan")
        else:
            y = float(power_plus_const(f["Y_opt"], C))
            y = 1.0 / y if f["Y_opt"].get("inverse") else y
    elif method == "quadratic":
        y = float(quadratic_predict(f, N, D)[0])
    else:
        y = float(chinchilla_predict(f, N, D))
    out = {"target": target, "method": method, "flops": C, "params": N, "samples": D, target: y,
           "a": alloc["a"], "b": alloc["b"]}
    rvl = fit.get("return_vs_loss")
    if target == "loss" and rvl:
        out["return_from_loss"] = float(np.exp(rvl["log_c"]["value"]) * y ** rvl["delta"]["value"])
    return out


def forecast(fit: dict, methods=None, targets=("loss", "return"), **given) -> list[dict]:
    """Forecasts for every method and target present in `fit`."""
    methods = methods or METHODS
    bad = set(methods) - set(METHODS)
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(sorted(bad))} (choose from {', '.join(METHODS)})")
    rows = []
    for t in targets:
        for m in methods:
            if m not in fit.get(t, {}):
                continue
            try:
                rows.append(forecast_one(fit, t, m, **given))
            except DataError:
                if len(methods) == 1:
                    raise
    if not rows:
        raise DataError("fit has none of the requested methods")
    return rows
