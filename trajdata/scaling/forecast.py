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
    for flag, v in (("--dataset-size", dataset_size), ("--compute", compute), ("--params", params)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise ConfigError(f"{flag} must be a positive finite number, not {v:g}")
    if compute is not None:
        return float(compute)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if dataset_size is not None:
            return float(np.exp((np.log(dataset_size) - alloc["log_gd"]) / alloc["b"]))
        return float(np.exp((np.log(params) - alloc["log_gn"]) / alloc["a"]))


def forecast_one(fit: dict, target: str, method: str, **given) -> dict:
    """One method's forecast for 'loss' (minimised) or 'return' (maximised)."""
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
    C = solve_compute(alloc, **given)
    with np.errstate(over="ignore", invalid="ignore"):
        N = float(np.exp(alloc["log_gn"]) * C ** alloc["a"])
        D = float(np.exp(alloc["log_gd"]) * C ** alloc["b"])
    if not all(np.isfinite(v) and v > 0 for v in (C, N, D)):
        raise DataError(f"the {target} {method} fit gives no finite compute-optimal run for "
                        + ", ".join(f"{k}={v:g}" for k, v in given.items() if v is not None))
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
    """Forecasts for every method that ran, for each target present in `fit`.

    With no rows to give, the DataError says why for each target and method that was asked for."""
    explicit = bool(methods)
    methods = methods or METHODS
    bad = set(methods) - set(METHODS)
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(sorted(bad))} (choose from {', '.join(METHODS)})")
    rows, why = [], []
    for t in targets:
        if t not in fit:
            if not any(u in fit for u in targets):
                why.append(f"the fit has no {t} data ({fit.get(t + '_skipped', 'not fitted')})")
            continue
        for m in methods:
            if m not in fit[t] and not explicit and m not in fit[t].get("methods", {}):
                continue
            try:
                rows.append(forecast_one(fit, t, m, **given))
            except DataError as e:
                if len(methods) == 1 and m in fit[t]:
                    raise
                why.append(str(e))
    if not rows:
        raise DataError("; ".join(why) if why else "fit has none of the requested methods")
    return rows


# the paper's forecast-run schedule: cosine from 2e-4, 2000 warm-up steps, to 0.1x
FORECAST_SCHEDULE = dict(schedule="cosine", lr=2e-4, warmup_steps=2000, min_lr_ratio=0.1)


def pick(rows: list[dict], target: str = "loss") -> dict:
    """The forecast to act on: the isoFLOP method's if it ran, else the first for ``target``."""
    mine = [r for r in rows if r["target"] == target] or rows
    return next((r for r in mine if r["method"] == "isoflop"), mine[0])


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
